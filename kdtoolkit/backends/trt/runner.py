"""Run a TensorRT plan: named tensors + execute_async_v3, device memory through the CUDA adapter; the runner protocol.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdtoolkit.backends.trt.lazy import PLAN_NAME, installed_version, load_tensorrt
from kdtoolkit.errors import CheckFailed, InputError

if TYPE_CHECKING:
    import tensorrt as trt

    from kdtoolkit.backends.trt.cuda_mem import DeviceBuffer
else:
    from kdtoolkit.backends.trt.lazy import trt


def _io_shape(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def engine_io(engine: trt.ICudaEngine) -> list[dict[str, Any]]:
    """Names, modes, dtypes, shapes and profile-0 ranges of the engine's IO tensors (named-tensor API, >= 8.5)."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        entry: dict[str, Any] = {"name": name, "mode": "input" if is_input else "output",
                                 "dtype": np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name,
                                 "shape": _io_shape(engine.get_tensor_shape(name))}
        if is_input:
            mn, op, mx = engine.get_tensor_profile_shape(name, 0)
            entry["profile"] = {"min": _io_shape(mn), "opt": _io_shape(op), "max": _io_shape(mx)}
        out.append(entry)
    return out


class TrtRunner:
    """Deserialise a plan and run it with named tensors + execute_async_v3; owns its device memory and stream.

    Use as a context manager (``open()``/``close()`` for the same without a ``with``); it implements the
    runner protocol of kdtoolkit.backends.base. A batch outside the engine's optimisation profile is an InputError.
    """

    kind = "tensorrt"
    load_rss_bytes: int | None = None

    def __init__(self, plan: str | os.PathLike[str], *, name: str = "tensorrt") -> None:
        p = Path(plan)
        if p.is_dir():
            from kdtoolkit.artifact import Artifact

            p = Artifact.load(p).file(PLAN_NAME)
        if not p.is_file():
            raise InputError(f"TensorRT plan not found: {p}")
        self.plan_path, self.name = p, name
        self._bufs: dict[str, DeviceBuffer] = {}
        self._stream: Any = None
        self.engine: trt.ICudaEngine | None = None
        self.context: trt.IExecutionContext | None = None

    def __enter__(self) -> TrtRunner:
        from kdtoolkit.backends.trt import cuda_mem

        load_tensorrt()
        self.mem = cuda_mem.backend()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise CheckFailed(f"{self.plan_path}: TensorRT {installed_version()} cannot deserialise this plan "
                              "(it was built with another TensorRT version or for another GPU)")
        self.engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise CheckFailed(f"{self.plan_path}: could not create an execution context (out of GPU memory?)")
        self.context = context
        self.io = engine_io(engine)
        self.inputs = [t for t in self.io if t["mode"] == "input"]
        self.outputs = [t for t in self.io if t["mode"] == "output"]
        self._stream = self.mem.stream()
        return self

    def __exit__(self, *exc: object) -> None:
        for b in self._bufs.values():
            b.free()
        self._bufs.clear()
        if self._stream is not None:
            self.mem.destroy_stream(self._stream)
            self._stream = None
        self.context = None
        self.engine = None

    # --- the runner protocol (kdtoolkit.backends.base.Runner) ---

    def open(self) -> TrtRunner:
        return self.__enter__()

    def close(self) -> None:
        if self.engine is not None or self._stream is not None:
            self.__exit__(None, None, None)

    def _profile(self) -> dict[str, Any]:
        return (self.inputs[0].get("profile") or {}) if self.engine is not None else {}

    def input_shape(self) -> tuple[Any, ...]:
        spec = self.inputs[0] if self.engine is not None else {}
        return tuple(self._profile().get("opt") or spec.get("shape") or ())

    def allowed_batch(self, batch: int) -> bool:
        mn, mx = self._profile().get("min"), self._profile().get("max")
        return not (mn and mx) or mn[0] <= batch <= mx[0]

    def describe(self) -> dict[str, Any]:
        return {"runner": self.kind, "path": str(self.plan_path), "profile": self._profile()}

    def _buffer(self, name: str, nbytes: int) -> DeviceBuffer:
        b = self._bufs.get(name)
        if b is None or b.nbytes < nbytes:
            if b is not None:
                b.free()
            b = self.mem.alloc(nbytes)
            self._bufs[name] = b
        return b

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        spec = next((t for t in self.inputs if t["name"] == name), None)
        if spec is None:
            raise InputError(f"the engine has no input {name!r}; its inputs: {', '.join(t['name'] for t in self.inputs)}")
        mn, mx = spec["profile"]["min"], spec["profile"]["max"]
        if len(shape) != len(mn):
            raise InputError(f"input {name} must have rank {len(mn)}, got shape {list(shape)}")
        if not mn[0] <= shape[0] <= mx[0]:
            raise InputError(f"batch {shape[0]} is outside the engine's profile: expected {mn[0]}..{mx[0]} for input {name}, got {shape[0]}")
        for ax, (lo, hi, got) in enumerate(zip(mn, mx, shape)):
            if not lo <= got <= hi:
                raise InputError(f"input {name} axis {ax} must be in {lo}..{hi}, got {got} (shape {list(shape)})")

    def run(self, feeds: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns output name -> host array."""
        if self.context is None:
            raise RuntimeError("TrtRunner must be used as a context manager")
        ctx = self.context
        if not isinstance(feeds, dict):
            feeds = {self.inputs[0]["name"]: feeds}
        for t in self.inputs:
            if t["name"] not in feeds:
                raise InputError(f"missing input {t['name']!r} for the engine")
            x = np.ascontiguousarray(feeds[t["name"]], dtype=np.dtype(t["dtype"]))
            self.check_shape(t["name"], tuple(x.shape))
            ctx.set_input_shape(t["name"], tuple(int(d) for d in x.shape))
            buf = self._buffer(t["name"], x.nbytes)
            self.mem.htod(buf, x, self._stream)
            ctx.set_tensor_address(t["name"], buf.ptr)
        results: dict[str, np.ndarray] = {}
        for t in self.outputs:
            shape = tuple(_io_shape(ctx.get_tensor_shape(t["name"])))
            host = np.empty(shape, dtype=np.dtype(t["dtype"]))
            buf = self._buffer(t["name"], host.nbytes)
            ctx.set_tensor_address(t["name"], buf.ptr)
            results[t["name"]] = host
        if not ctx.execute_async_v3(self.mem.stream_handle(self._stream)):
            raise CheckFailed(f"{self.plan_path}: execute_async_v3 failed")
        for name, host in results.items():
            self.mem.dtoh(host, self._bufs[name], self._stream)
        self.mem.synchronize(self._stream)
        return results

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)[self.outputs[0]["name"]]
