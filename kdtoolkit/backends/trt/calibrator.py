"""Implicit INT8 below TensorRT 11: calibration inputs and the IInt8EntropyCalibrator2 that feeds them (with a cache file).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdtoolkit import fsutil
from kdtoolkit.errors import InputError

if TYPE_CHECKING:
    import tensorrt as trt

    from kdtoolkit.backends.trt.cuda_mem import CudaBackend, DeviceBuffer
else:
    from kdtoolkit.backends.trt.lazy import trt


def calibration_arrays(source: str, input_shape: tuple[int, ...], *, limit: int, meta: dict[str, Any] | None = None,
                       seed: int = 0, on_bad_image: str = "fail") -> np.ndarray:
    """Float32 N,C,H,W calibration inputs: a .npy of preprocessed arrays, or a dataset (its training split; .npz is a dataset)."""
    p = Path(source)
    if p.suffix == ".npy" and p.is_file():
        arr = np.asarray(np.load(p), dtype=np.float32)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(input_shape):
            raise InputError(f"{source}: calibration arrays must be N,{','.join(map(str, input_shape))}, got {tuple(arr.shape)}")
        return arr[:limit]
    from kdtoolkit.data import load_data
    from kdtoolkit.data.datasets import to_tensor
    from kdtoolkit.data.inputspec import InputSpec

    given = InputSpec.from_meta(meta)
    c, h, w = input_shape
    sp = load_data(source, input_size=(h, w), channels=c, mean=given.mean, std=given.std, on_bad_image=on_bad_image)
    train = sp.train
    if len(train) > limit:
        train = train.subset(np.sort(np.random.default_rng(seed).choice(len(train), limit, replace=False)))
    return np.asarray(to_tensor(train.x, sp.spec).numpy(), dtype=np.float32)


def _make_calibrator(arrays: np.ndarray | None, batch_size: int, cache_path: Path | None,
                     mem: CudaBackend | None) -> tuple[trt.IInt8EntropyCalibrator2, Callable[[], None]]:
    """An IInt8EntropyCalibrator2 fed from calibration batches, reading/writing a calibration cache file.

    Defined inside a function because its base class exists only once TensorRT is imported.
    """

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.arrays = arrays
            self.bs = batch_size
            self.index = 0
            self.buf: DeviceBuffer | None = None

        def get_batch_size(self) -> int:
            return self.bs

        def get_batch(self, names: list[str]) -> list[int]:
            if self.arrays is None or mem is None or self.index + self.bs > len(self.arrays):
                return None  # type: ignore[return-value]  # TensorRT's documented "no more batches" (the stubs say list)
            batch = np.ascontiguousarray(self.arrays[self.index:self.index + self.bs], dtype=np.float32)
            self.index += self.bs
            if self.buf is None:
                self.buf = mem.alloc(batch.nbytes)
            stream = mem.stream()
            mem.htod(self.buf, batch, stream)
            mem.synchronize(stream)
            mem.destroy_stream(stream)
            return [self.buf.ptr]

        def read_calibration_cache(self) -> bytes:
            if cache_path is not None and cache_path.is_file() and cache_path.stat().st_size:
                return cache_path.read_bytes()
            return None  # type: ignore[return-value]  # TensorRT's documented "no cache: calibrate" (the stubs say Buffer)

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None:
                fsutil.write_bytes(cache_path, bytes(memoryview(cache)))

        def free(self) -> None:
            if self.buf is not None:
                self.buf.free()
                self.buf = None

    calib = EntropyCalibrator()
    return calib, calib.free
