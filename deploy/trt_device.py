"""TensorRT and CUDA pieces for the on-device scripts (infer_tensorrt.py, device_report.py).

Needs only numpy, tensorrt and one CUDA binding (pycuda, or cuda-python pinned to the driver's CUDA
major), and runs on Python 3.8 (JetPack 5), so kdtoolkit itself need not be installed on the device.
Written against the TensorRT 8.5 .. 11 public Python API: named tensors (set_input_shape,
set_tensor_address, execute_async_v3), builder flags and an entropy calibrator reading a cache below
11, strongly typed networks from 11.
"""

from __future__ import annotations

import os
import re
import sys
import time

import numpy as np


class DeviceError(RuntimeError):
    """A one-line, actionable error of the on-device scripts."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return "%s: %s" % (type(exc).__name__, text.splitlines()[0][:200]) if text else type(exc).__name__


# ---------------------------------------------------------------------------------------- CUDA bindings

def cuda_major_of_driver(driver_version: int) -> int:
    """cudaDriverGetVersion's integer (12060 = CUDA 12.6) -> the CUDA major it supports."""
    return int(driver_version) // 1000


def binding_fits_driver(binding_version: str, driver_version: int):
    """None when cuda-python ``binding_version`` runs on this driver, else why not (13.x needs a CUDA 13 driver)."""
    m = re.match(r"^\s*(\d+)", str(binding_version))
    if not m:
        return None
    need, have = int(m.group(1)), cuda_major_of_driver(driver_version)
    if need > have:
        return ("cuda-python %s needs a CUDA %d driver, this driver supports CUDA %d: pip install 'cuda-python>=%d.0,<%d' "
                "(or use pycuda)" % (binding_version, need, have, have, have + 1))
    return None


def _cuda_python_version() -> str:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return ""
    for dist in ("cuda-python", "cuda-bindings"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


class CudaPython:
    """Device memory and a stream through cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""

    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart  # cuda-python < 12.6
        self.rt = cudart
        driver = self._ok(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
        problem = binding_fits_driver(_cuda_python_version(), int(driver)) if driver else None
        if problem:
            raise DeviceError(problem)
        if not self._ok(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"):
            raise DeviceError("no CUDA device is visible")
        self.stream = self._ok(cudart.cudaStreamCreate(), "cudaStreamCreate")

    def _ok(self, res, what="CUDA call"):
        err, rest = (res[0], list(res[1:])) if isinstance(res, tuple) else (res, [])
        if int(err) != 0:
            raise DeviceError("CUDA %s failed: %s" % (what, err))
        return rest[0] if len(rest) == 1 else (tuple(rest) or None)

    def alloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(1, int(nbytes))), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self._ok(self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                         self.stream), "cudaMemcpyAsync(HtoD)")

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                         self.stream), "cudaMemcpyAsync(DtoH)")

    @property
    def handle(self) -> int:
        return int(self.stream)

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def device(self):
        """(GPU name, (major, minor) compute capability)."""
        dev = self._ok(self.rt.cudaGetDevice(), "cudaGetDevice")
        p = self._ok(self.rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        name = p.name.split(b"\0", 1)[0].decode() if isinstance(p.name, (bytes, bytearray)) else str(p.name)
        return name, (int(p.major), int(p.minor))


class PyCuda:
    """Device memory and a stream through pycuda; its own exceptions come out as DeviceError."""

    name = "pycuda"

    def __init__(self) -> None:
        import pycuda.driver as cuda

        try:
            try:
                import pycuda.autoprimaryctx  # noqa: F401  (the runtime's primary context, which TensorRT uses)
            except ImportError as exc:
                if "autoprimaryctx" not in str(exc):
                    raise
                import pycuda.autoinit  # noqa: F401
        except ImportError:
            raise
        except Exception as exc:  # pycuda._driver.Error: cuInit failed, no device, driver too old
            raise DeviceError("pycuda is installed but CUDA does not initialise (%s)" % _first_line(exc)) from None
        self.cuda = cuda
        self.stream = self._call("stream creation", cuda.Stream)
        self._mem = {}

    def _call(self, what, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:
            raise DeviceError("CUDA %s through pycuda failed (%s)" % (what, _first_line(exc))) from None

    def alloc(self, nbytes: int) -> int:
        mem = self._call("memory allocation", self.cuda.mem_alloc, max(1, int(nbytes)))
        self._mem[int(mem)] = mem
        return int(mem)

    def free(self, ptr: int) -> None:
        mem = self._mem.pop(ptr, None)
        if mem is not None:
            mem.free()

    def htod(self, ptr: int, host: np.ndarray) -> None:
        self._call("host-to-device copy", self.cuda.memcpy_htod_async, ptr, host, self.stream)

    def dtoh(self, host: np.ndarray, ptr: int) -> None:
        self._call("device-to-host copy", self.cuda.memcpy_dtoh_async, host, ptr, self.stream)

    @property
    def handle(self) -> int:
        return int(self.stream.handle)

    def sync(self) -> None:
        self._call("stream synchronize", self.stream.synchronize)

    def device(self):
        dev = self.cuda.Context.get_device()
        major, minor = dev.compute_capability()
        return str(dev.name()), (int(major), int(minor))


BINDINGS = {"pycuda": PyCuda, "cuda-python": CudaPython}


def cuda_adapter(prefer=None):
    """The first CUDA binding that works here: ``prefer`` or KDTOOLKIT_CUDA_BACKEND, else pycuda, then cuda-python.

    Any failure of one (not only ImportError: a cuda-python too new for the driver, pycuda without a
    device) moves on to the next; when none works, one DeviceError names every reason.
    """
    wanted = prefer or os.environ.get("KDTOOLKIT_CUDA_BACKEND")
    if wanted and wanted not in BINDINGS:
        raise DeviceError("KDTOOLKIT_CUDA_BACKEND must be one of %s, got %r" % (", ".join(BINDINGS), wanted))
    reasons = []
    for name in ([wanted] if wanted else list(BINDINGS)):
        try:
            return BINDINGS[name]()
        except ImportError as exc:
            reasons.append("%s: not installed (%s)" % (name, exc))
        except DeviceError as exc:
            reasons.append("%s: %s" % (name, exc))
    raise DeviceError("no usable CUDA binding (%s); install pycuda, or cuda-python pinned to this driver's CUDA major "
                      "(CUDA 12: pip install 'cuda-python>=12.6,<13')" % "; ".join(reasons))


# ---------------------------------------------------------------------------------------- TensorRT

def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise DeviceError("TensorRT's Python package is not importable (%s): on JetPack install python3-libnvinfer, "
                          "elsewhere pip install tensorrt matching the installed TensorRT" % exc) from None
    if not hasattr(trt, "Builder"):
        raise DeviceError("only type stubs were found for 'tensorrt', not TensorRT itself")
    return trt


def version_tuple(text: str):
    nums = [int(x) for x in re.findall(r"\d+", str(text))[:3]]
    return tuple(nums + [0] * (3 - len(nums)))


def build_plan(trt, onnx_path: str, build: dict, log=print) -> bytes:
    """Build a raw plan from ``onnx_path`` with the bundle's build settings (precision, shapes, DLA, calibration cache)."""
    v = version_tuple(trt.__version__)
    typed = v[0] >= 11
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if v[0] < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if typed and strongly is not None:
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as fh:
        if not parser.parse(fh.read(), onnx_path):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise DeviceError("TensorRT %s cannot parse %s: %s" % (trt.__version__, onnx_path, errs[0] if errs else "unknown error"))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.get("workspace_mb", 1024)) << 20)
    profile = builder.create_optimization_profile()
    shapes = build.get("shapes") or {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        s = shapes.get(t.name)
        if s is None:
            dims = [int(d) for d in t.shape]
            if any(d < 0 for d in dims):
                raise DeviceError("input %s has dynamic axes %s and the bundle gives no shapes for it" % (t.name, dims))
            s = {"min": dims, "opt": dims, "max": dims}
        profile.set_shape(t.name, trt.Dims(list(s["min"])), trt.Dims(list(s["opt"])), trt.Dims(list(s["max"])))
    config.add_optimization_profile(profile)
    precision = build.get("precision", "fp32")
    cache = build.get("calibration_cache")
    calibrator = None
    if typed:
        if precision == "fp16" and not build.get("qdq"):
            raise DeviceError("TensorRT >= 11 takes FP16 only from an FP16 ONNX: build with `kdtoolkit build` (converts it) "
                              "or trtexec --stronglyTyped on an FP16 ONNX")
    else:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
            if not build.get("qdq"):
                if not cache or not os.path.isfile(cache):
                    raise DeviceError("implicit INT8 needs the calibration cache %r, which is not there; never build INT8 "
                                      "without one (TensorRT would use placeholder ranges)" % cache)
                calibrator = _cache_calibrator(trt, cache)
                config.int8_calibrator = calibrator
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)
    if build.get("dla_core") is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(build["dla_core"])
        if build.get("gpu_fallback", True):
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    log("[device] building with TensorRT %s (%s, %s%s)" % (trt.__version__, os.path.basename(onnx_path), precision,
                                                            ", DLA core %s" % build["dla_core"] if build.get("dla_core") is not None else ""))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DeviceError("TensorRT %s failed to build an engine from %s (its log above says why)" % (trt.__version__, onnx_path))
    return bytes(memoryview(plan))


def _cache_calibrator(trt, cache_path: str):
    """An IInt8EntropyCalibrator2 that only reads the cache: TensorRT then takes every scale from it, no batches."""

    class CacheOnly(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            with open(cache_path, "rb") as fh:
                return fh.read()

        def write_calibration_cache(self, cache):
            pass

    return CacheOnly()


class EngineRunner:
    """One engine, one execution context; named tensors; batches checked against the engine's profile."""

    def __init__(self, trt, plan: bytes, cuda) -> None:
        self.trt, self.cuda = trt, cuda
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise DeviceError("TensorRT %s cannot load this plan: engines are tied to the GPU and TensorRT version; rebuild it "
                              "here" % trt.__version__)
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._bufs = {}

    def batch_range(self):
        mn, _, mx = self.engine.get_tensor_profile_shape(self.inputs[0], 0)
        return int(mn[0]), int(mx[0])

    def _buf(self, name, nbytes):
        b = self._bufs.get(name)
        if b is None or b[1] < nbytes:
            if b is not None:
                self.cuda.free(b[0])
            b = (self.cuda.alloc(nbytes), nbytes)
            self._bufs[name] = b
        return b[0]

    def prepare(self, x: np.ndarray):
        """Set shapes and addresses and copy ``x`` in; returns the host output arrays."""
        trt, eng, ctx = self.trt, self.engine, self.context
        name = self.inputs[0]
        x = np.ascontiguousarray(x.astype(trt.nptype(eng.get_tensor_dtype(name))))
        if not ctx.set_input_shape(name, tuple(int(d) for d in x.shape)):
            lo, hi = self.batch_range()
            raise DeviceError("the engine does not take input shape %s for %s (batch %d..%d)" % (list(x.shape), name, lo, hi))
        ptr = self._buf(name, x.nbytes)
        ctx.set_tensor_address(name, ptr)
        self.cuda.htod(ptr, x)
        hosts = {}
        for out in self.outputs:
            host = np.empty(tuple(int(d) for d in ctx.get_tensor_shape(out)), dtype=trt.nptype(eng.get_tensor_dtype(out)))
            ctx.set_tensor_address(out, self._buf(out, host.nbytes))
            hosts[out] = host
        return hosts

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.handle):
            raise DeviceError("TensorRT execute_async_v3 failed")
        self.cuda.sync()

    def __call__(self, x: np.ndarray):
        hosts = self.prepare(x)
        if not self.context.execute_async_v3(self.cuda.handle):
            raise DeviceError("TensorRT execute_async_v3 failed")
        for name, host in hosts.items():
            self.cuda.dtoh(host, self._bufs[name][0])
        self.cuda.sync()
        return hosts

    def time_batch(self, x: np.ndarray, iters: int, warmup: int):
        """Milliseconds per execute_async_v3 + stream sync (input already on the device), ``iters`` samples."""
        self.prepare(x)
        self.cuda.sync()
        for _ in range(warmup):
            self.execute()
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.execute()
            out.append((time.perf_counter() - t0) * 1000.0)
        return out

    def close(self) -> None:
        for ptr, _ in self._bufs.values():
            self.cuda.free(ptr)
        self._bufs = {}


def stderr(msg: str) -> None:
    sys.stderr.write(msg + "\n")
