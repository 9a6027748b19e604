"""Device memory for the calibrator and the runner through ONE small adapter: pycuda or cuda-python.

TensorRT's own samples moved from pycuda to cuda-python (``cuda.bindings``) in 10.14; JetPack images
often ship only pycuda. Both are imported lazily, on first use, and whichever is present is used
(``KDTOOLKIT_CUDA_BACKEND=pycuda|cuda-python`` picks one). Everything the engine code needs is
here: allocate, free, async copies both ways on a stream, synchronise, the device name and compute
capability.

Errors from either binding come out as one-line kdtoolkit errors (CheckFailed, exit 1): pycuda raises
its own ``pycuda._driver.Error`` family (``cuInit failed: no CUDA-capable device``), and cuda-python
13.x needs a CUDA 13 driver (580.65+) while JetPack 6 and CUDA 12.6 images have a CUDA 12 one, so the
binding's major version is checked against the driver's before anything else (pin
``cuda-python>=12.6,<13`` there).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from kdtoolkit.errors import CheckFailed, MissingDependency

_HINT = "pip install 'kdtoolkit[tensorrt]' (brings pycuda) or pip install 'cuda-python>=12.6,<13' (CUDA 12 drivers)"
_F = TypeVar("_F", bound=Callable[..., Any])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _wrap_pycuda(what: str) -> Callable[[_F], _F]:
    """pycuda's own exceptions (pycuda._driver.Error and subclasses) become one-line CheckFailed errors."""

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def inner(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except CheckFailed:
                raise
            except Exception as exc:
                if type(exc).__module__.startswith("pycuda") or isinstance(exc, (RuntimeError, MemoryError)):
                    raise CheckFailed(f"CUDA {what} through pycuda failed ({_first_line(exc)})") from None
                raise

        return inner  # type: ignore[return-value]

    return deco


def cuda_major_of_driver(driver_version: int) -> int:
    """cudaDriverGetVersion's integer (12060 = CUDA 12.6) -> the CUDA major version it supports."""
    return int(driver_version) // 1000


def binding_fits_driver(binding_version: str, driver_version: int) -> str | None:
    """None when cuda-python ``binding_version`` runs on a driver reporting ``driver_version``; else why not.

    cuda-python's major version is the CUDA major it is built for: 13.x calls need a CUDA 13 driver
    (R580.65+), and a CUDA 12.6 image (JetPack 6, TensorRT containers 24.x) has a CUDA 12 driver.
    """
    m = re.match(r"^\s*(\d+)", str(binding_version))
    if not m:
        return None  # unknown version string: let the first call say what is wrong
    need, have = int(m.group(1)), cuda_major_of_driver(driver_version)
    if need > have:
        return (f"cuda-python {binding_version} needs a CUDA {need} driver, this driver supports CUDA "
                f"{have}.{(int(driver_version) % 1000) // 10}: pip install 'cuda-python>={have}.0,<{have + 1}' (or use pycuda)")
    return None


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

    def compute_capability(self) -> tuple[int, int]:
        raise NotImplementedError


class _PyCuda(CudaBackend):
    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda

        try:
            try:
                import pycuda.autoprimaryctx  # noqa: F401  (the runtime API's primary context, which TensorRT uses)
            except ImportError as exc:
                if "autoprimaryctx" not in str(exc):
                    raise
                import pycuda.autoinit  # noqa: F401  (pycuda < 2021.1)
        except ImportError as exc:
            # pycuda's auto-context modules import fine only where a device initialises; an ImportError that
            # is not about the module itself means libcuda is missing or broken (no driver)
            if "pycuda" in str(exc) and "No module named" in str(exc):
                raise
            raise CheckFailed(f"pycuda is installed but CUDA does not initialise ({_first_line(exc)}); is the NVIDIA driver "
                              "present (docker: --gpus all / --runtime nvidia)?") from None
        except Exception as exc:  # pycuda._driver.Error family: cuInit failed, no device, driver too old
            raise CheckFailed(f"pycuda is installed but CUDA does not initialise ({_first_line(exc)}); is a GPU visible "
                              "(nvidia-smi, docker --gpus all / --runtime nvidia)?") from None
        self.cuda = cuda

    @_wrap_pycuda("memory allocation")
    def alloc(self, nbytes: int) -> DeviceBuffer:
        h = self.cuda.mem_alloc(max(int(nbytes), 1))
        return DeviceBuffer(self, int(h), nbytes, h)

    @_wrap_pycuda("free")
    def _free(self, buf: DeviceBuffer) -> None:
        if buf._handle is not None:
            buf._handle.free()

    @_wrap_pycuda("stream creation")
    def stream(self) -> Any:
        return self.cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    @_wrap_pycuda("host-to-device copy")
    def htod(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dst.ptr, np.ascontiguousarray(src), stream)

    @_wrap_pycuda("device-to-host copy")
    def dtoh(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(dst, src.ptr, stream)

    @_wrap_pycuda("stream synchronize")
    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def destroy_stream(self, stream: Any) -> None:
        pass  # pycuda frees the stream when it is garbage collected

    @_wrap_pycuda("device query")
    def device_name(self) -> str:
        return str(self.cuda.Context.get_device().name())

    @_wrap_pycuda("device query")
    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.cuda.Context.get_device().compute_capability()
        return int(major), int(minor)


class _CudaPython(CudaBackend):
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
        self.rt = cudart
        driver = self._ok(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
        problem = binding_fits_driver(_cuda_python_version(), int(driver)) if driver else None
        if problem:
            raise CheckFailed(problem)
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

    def compute_capability(self) -> tuple[int, int]:
        dev = self._ok(self.rt.cudaGetDevice(), "cudaGetDevice")
        props = self._ok(self.rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        return int(props.major), int(props.minor)


def _cuda_python_version() -> str:
    """The installed cuda-python (or cuda-bindings) version, '' when unknown."""
    from importlib import metadata

    for dist in ("cuda-python", "cuda-bindings"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


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
    missing, broken = [], []
    for name in order:
        try:
            _active = _BACKENDS[name]()
            return _active
        except ImportError as exc:
            missing.append(f"{name}: {exc}")
        except CheckFailed as exc:
            broken.append(f"{name}: {exc}")
    if broken:
        raise CheckFailed(f"no usable CUDA binding ({'; '.join(broken + missing)})")
    raise MissingDependency(f"device memory needs pycuda or cuda-python, got neither ({'; '.join(missing)}); install one: {_HINT}")
