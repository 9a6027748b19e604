"""Device memory for the calibrator and the runner through ONE small adapter: pycuda or cuda-python.

TensorRT's own samples moved from pycuda to cuda-python (``cuda.bindings``) in 10.14; JetPack images
often ship only pycuda. Both are imported lazily, on first use, and whichever is present is used
(``KDTOOLKIT_CUDA_BACKEND=pycuda|cuda-python`` picks one). Everything the engine code needs is
here: allocate, free, async copies both ways on a stream, synchronise, and the device name.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kdtoolkit.errors import CheckFailed, MissingDependency

_HINT = "pip install 'kdtoolkit[tensorrt]' (brings pycuda) or pip install cuda-python"


class DeviceBuffer:
    """A device allocation; ``ptr`` is the integer address TensorRT's set_tensor_address takes."""

    def __init__(self, backend: CudaBackend, ptr: int, nbytes: int, handle: Any = None) -> None:
        self.backend, self.ptr, self.nbytes, self._handle = backend, int(ptr), int(nbytes), handle

    def free(self) -> None:
        if self._handle is not None or self.ptr:
            self.backend._free(self)
            self._handle, self.ptr = None, 0


class CudaBackend:
    """The operations the engine code uses; one subclass per CUDA binding."""

    name = "?"

    def alloc(self, nbytes: int) -> DeviceBuffer:
        raise NotImplementedError

    def _free(self, buf: DeviceBuffer) -> None:
        raise NotImplementedError

    def stream(self) -> Any:
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        raise NotImplementedError

    def htod(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        raise NotImplementedError

    def dtoh(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        raise NotImplementedError

    def synchronize(self, stream: Any) -> None:
        raise NotImplementedError

    def destroy_stream(self, stream: Any) -> None:
        raise NotImplementedError

    def device_name(self) -> str:
        raise NotImplementedError


class _PyCuda(CudaBackend):
    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda

        try:
            import pycuda.autoprimaryctx  # noqa: F401  (the runtime API's primary context, which TensorRT uses)
        except ImportError:
            import pycuda.autoinit  # noqa: F401
        self.cuda = cuda

    def alloc(self, nbytes: int) -> DeviceBuffer:
        h = self.cuda.mem_alloc(max(int(nbytes), 1))
        return DeviceBuffer(self, int(h), nbytes, h)

    def _free(self, buf: DeviceBuffer) -> None:
        if buf._handle is not None:
            buf._handle.free()

    def stream(self) -> Any:
        return self.cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def htod(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dst.ptr, np.ascontiguousarray(src), stream)

    def dtoh(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(dst, src.ptr, stream)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def destroy_stream(self, stream: Any) -> None:
        pass  # pycuda frees the stream when it is garbage collected

    def device_name(self) -> str:
        return str(self.cuda.Context.get_device().name())


class _CudaPython(CudaBackend):
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        self.rt = cudart
        n = self._ok(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if not n:
            raise CheckFailed("no CUDA device is visible: expected at least one GPU, got 0")

    def _ok(self, res: Any, what: str) -> Any:
        err, *rest = res if isinstance(res, tuple) else (res,)
        if int(err) != 0:
            raise CheckFailed(f"CUDA {what} failed: {err!s}")
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = self._ok(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")
        return DeviceBuffer(self, int(ptr), nbytes, ptr)

    def _free(self, buf: DeviceBuffer) -> None:
        self._ok(self.rt.cudaFree(buf.ptr), "cudaFree")

    def stream(self) -> Any:
        return self._ok(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def htod(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        src = np.ascontiguousarray(src)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst.ptr, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync(HtoD)")

    def dtoh(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src.ptr, dst.nbytes, kind, stream), "cudaMemcpyAsync(DtoH)")

    def synchronize(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def device_name(self) -> str:
        dev = self._ok(self.rt.cudaGetDevice(), "cudaGetDevice")
        props = self._ok(self.rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        name = props.name
        return name.split(b"\0", 1)[0].decode() if isinstance(name, (bytes, bytearray)) else str(name)


_BACKENDS = {"pycuda": _PyCuda, "cuda-python": _CudaPython}
_active: CudaBackend | None = None


def backend() -> CudaBackend:
    """The process's CUDA adapter: the one named by KDTOOLKIT_CUDA_BACKEND, else pycuda, else cuda-python."""
    global _active
    if _active is not None:
        return _active
    wanted = os.environ.get("KDTOOLKIT_CUDA_BACKEND")
    if wanted and wanted not in _BACKENDS:
        from kdtoolkit.errors import InputError

        raise InputError(f"KDTOOLKIT_CUDA_BACKEND must be one of {', '.join(_BACKENDS)}, got {wanted!r}")
    order = [wanted] if wanted else list(_BACKENDS)
    errors = []
    for name in order:
        try:
            _active = _BACKENDS[name]()
            return _active
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise MissingDependency(f"device memory needs pycuda or cuda-python, got neither ({'; '.join(errors)}); install one: {_HINT}")
