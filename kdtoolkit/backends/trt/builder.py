"""TensorRT engine builder and runner for TensorRT 8.5 .. 11, written against the public Python API.

One builder reads the installed version and takes the path :func:`trt_version.build_path` chose:
builder flags + IInt8EntropyCalibrator2 below 11, strongly typed networks from 11 (INT8 only from
Q/DQ, FP16 by converting the ONNX first). It writes the RAW serialised plan (no header of ours, so
trtexec, C++ and DeepStream load it) and puts everything else in the manifest beside it.

``tensorrt`` is imported lazily (never at ``import kdtoolkit``); for type checking, mypy reads
NVIDIA's ``tensorrt-stubs`` through the TYPE_CHECKING import below, so a misused API fails in CI.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kdtoolkit import fsutil
from kdtoolkit.engine.trt_version import BuildPath, build_path, dla_plan
from kdtoolkit.errors import CheckFailed, InputError, MissingDependency, lazy_import

if TYPE_CHECKING:
    import tensorrt as trt

    from kdtoolkit.artifact import Artifact
    from kdtoolkit.engine.cuda_mem import CudaBackend, DeviceBuffer
    from kdtoolkit.profiles import Profile

INSTALL_HINT = (
    "install it on the machine with the target GPU: pip install 'kdtoolkit[tensorrt]' (x86, or JetPack's own python3-libnvinfer "
    "on Jetson), or use the docker images docker/tensorrt-x86.Dockerfile (x86 GPU) and docker/jetson-l4t.Dockerfile "
    "(Jetson); `kdtoolkit check` runs without TensorRT"
)
PLAN_NAME = "model.plan"


def load_tensorrt() -> Any:
    """Import TensorRT or raise MissingDependency (exit 3) that says exactly what to install."""
    try:
        mod = lazy_import("tensorrt", extra="tensorrt", purpose="building and running TensorRT engines")
    except MissingDependency as exc:
        raise MissingDependency(f"TensorRT is not installed ({exc.__cause__}); {INSTALL_HINT}") from None
    if not hasattr(mod, "Builder"):  # tensorrt-stubs alone leave an empty `tensorrt` namespace package
        raise MissingDependency(f"TensorRT is not installed (only type stubs were found for 'tensorrt'); {INSTALL_HINT}")
    return mod


class _LazyTensorRT:
    """Stands in for the ``tensorrt`` module at run time, importing it on first attribute use."""

    def __getattr__(self, name: str) -> Any:
        return getattr(load_tensorrt(), name)


if not TYPE_CHECKING:
    trt = _LazyTensorRT()


def installed_version() -> str:
    return str(load_tensorrt().__version__)


class BuildConfig(BaseModel):
    """Everything a build depends on, resolved from the profile and flags; stored in the manifest."""

    model_config = ConfigDict(extra="forbid")
    precision: Literal["int8", "fp16", "fp32"] = Field(description="resolved precision (auto is resolved before building)")
    precision_reason: str = Field("", description="why this precision (profile, flag, or the auto rule)")
    batch_min: int = Field(1, ge=1, description="optimisation profile: smallest batch")
    batch_opt: int = Field(1, ge=1, description="optimisation profile: batch tuned for")
    batch_max: int = Field(1, ge=1, description="optimisation profile: largest batch")
    static_input_shape: list[int] | None = Field(None, description="pinned N,C,H,W (DLA / profiles that need static shapes)")
    workspace_mb: int = Field(1024, ge=16, description="builder workspace (set_memory_pool_limit WORKSPACE)")
    builder_optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimisation level (>= 8.6)")
    dla_core: int | None = Field(None, description="DLA core, or None for the GPU")
    gpu_fallback: bool = Field(True, description="let DLA layers fall back to the GPU")
    timing_cache: str | None = Field(None, description="timing cache file reused across builds")
    calib_batch_size: int = Field(8, ge=1, description="batch size fed to the entropy calibrator")
    calib_size: int = Field(512, ge=1, description="calibration samples")
    calib_cache: str | None = Field(None, description="calibration cache to read (and write) for implicit INT8")


def resolve_config(profile: Profile, *, has_qdq: bool, precision: str | None = None, timing_cache: str | None = None,
                   calib_cache: str | None = None, trt_path: BuildPath | None = None, device_key: str | None = None) -> BuildConfig:
    """Turn a profile (plus flags) into a BuildConfig; ``auto`` becomes int8 for a Q/DQ ONNX, else fp16.

    A relative profile timing cache lives in kdtoolkit's cache under the TensorRT version AND the device
    (GPU name + compute capability, ``device_key``): a cache from another GPU is useless to TensorRT.
    """
    if not profile.is_tensorrt or profile.tensorrt is None:
        raise InputError(f"profile {profile.name} has backend {profile.backend}; `build` makes TensorRT engines: pick a tensorrt profile")
    t = profile.tensorrt
    p = precision or profile.precision
    reason = "from --precision" if precision else f"from profile {profile.name}"
    if p == "auto":
        p, reason = ("int8", "auto: the ONNX carries Q/DQ") if has_qdq else ("fp16", "auto: no Q/DQ in the ONNX and no measurement at build time")
    if p not in ("int8", "fp16", "fp32"):
        raise InputError(f"precision must be int8, fp16, fp32 or auto, got {p!r}")
    resolved: Literal["int8", "fp16", "fp32"] = "int8" if p == "int8" else "fp16" if p == "fp16" else "fp32"
    b = profile.batch
    static = profile.static_input_shape
    bmin, bopt, bmax = (static[0],) * 3 if static else (b.min, b.opt, b.max)
    if t.dla_core is not None and bmin != bmax:
        bmin = bopt = bmax = b.opt  # DLA: no dynamic dimensions, min = opt = max
    cache = timing_cache
    if cache is None and t.timing_cache:
        cache = t.timing_cache
        if not os.path.isabs(cache):
            from kdtoolkit.data.datasets import cache_dir

            v = ".".join(map(str, trt_path.version)) if trt_path else "unknown"
            cache = str(cache_dir() / "tensorrt" / f"trt-{v}" / (device_key or "unknown-device") / cache)
    return BuildConfig(
        precision=resolved, precision_reason=reason, batch_min=bmin, batch_opt=bopt, batch_max=bmax, static_input_shape=static,
        workspace_mb=t.workspace_mb, builder_optimization_level=t.builder_optimization_level, dla_core=t.dla_core,
        gpu_fallback=t.gpu_fallback, timing_cache=cache, calib_size=profile.quant.calib_size,
        calib_batch_size=max(1, min(32, bmax)) if t.dla_core is None else bopt, calib_cache=calib_cache,
    )


def convert_onnx_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """FP16 for strongly typed TensorRT (>= 11): convert the ONNX itself, keeping fp32 inputs and outputs."""
    import onnx

    model = onnx.load(str(src))
    try:
        from onnxconverter_common import float16

        converted = float16.convert_float_to_float16(model, keep_io_types=True)
        tool = "onnxconverter-common float16"
    except ImportError:
        try:  # onnx itself ships no float16 converter; onnxruntime carries the same code
            from onnxruntime.transformers import float16 as ort_float16
        except ImportError as exc:
            raise MissingDependency(f"FP16 on TensorRT >= 11 converts the ONNX first and needs onnxconverter-common ({exc}); "
                                    "install it: pip install onnxconverter-common") from None
        converted = ort_float16.convert_float_to_float16(model, keep_io_types=True)
        tool = "onnxruntime.transformers float16"
    with fsutil.atomic_path(dst, suffix=".onnx") as tmp:
        onnx.save(converted, str(tmp))
    return tool


def calibration_arrays(source: str, input_shape: tuple[int, ...], *, limit: int, meta: dict[str, Any] | None = None,
                       seed: int = 0) -> np.ndarray:
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
    sp = load_data(source, input_size=(h, w), channels=c, mean=given.mean, std=given.std)
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


def _io_shape(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def _profile_shapes(dims: list[int], cfg: BuildConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    if cfg.static_input_shape is not None:
        s = tuple(cfg.static_input_shape)
        if len(s) != len(dims) or any(d not in (-1, v) for d, v in zip(dims, s)):
            raise InputError(f"input {name} has shape {dims}, which does not fit the profile's static shape {list(s)}")
        return s, s, s
    if any(d < 0 for d in dims[1:]):
        raise InputError(f"input {name} has dynamic non-batch axes {dims}; expected only the batch axis to be dynamic")
    if dims[0] >= 0:
        if not cfg.batch_min <= dims[0] <= cfg.batch_max or cfg.batch_min != cfg.batch_max:
            raise InputError(f"input {name} has a fixed batch {dims[0]}, but the profile asks for batch "
                             f"{cfg.batch_min}..{cfg.batch_max}; export with a dynamic batch axis")
        s = tuple(dims)
        return s, s, s
    rest = tuple(dims[1:])
    return (cfg.batch_min, *rest), (cfg.batch_opt, *rest), (cfg.batch_max, *rest)


def _layer_report(engine: trt.ICudaEngine) -> dict[str, Any]:
    """The engine inspector's per-layer JSON (which layers exist, and where DLA took them)."""
    inspector = engine.create_engine_inspector()
    raw = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        info = json.loads(raw)
    except json.JSONDecodeError:
        return {"raw": raw, "layers": []}
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    names = [(la.get("Name", "") if isinstance(la, dict) else str(la)) for la in layers]
    types = [(la.get("LayerType", "") if isinstance(la, dict) else "") for la in layers]
    dla = [n for n, t in zip(names, types) if "dla" in t.lower() or "ForeignNode" in n]
    return {"layers": layers, "n_layers": len(layers), "dla_layers": dla}


def gpu_cache_key(name: str, capability: tuple[int, int] | None) -> str:
    """A file-name-safe key for a GPU: its name and compute capability ('NVIDIA A10', (8, 6) -> 'NVIDIA-A10-sm86')."""
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip("-") or "unknown-gpu"
    return f"{slug}-sm{capability[0]}{capability[1]}" if capability else slug


def _device_identity() -> tuple[str, str]:
    """(GPU name, cache key) of the current device through the CUDA adapter; ('', 'unknown-device') without one."""
    from kdtoolkit.engine import cuda_mem
    from kdtoolkit.errors import KdtError

    try:
        b = cuda_mem.backend()
        name = b.device_name()
        return name, gpu_cache_key(name, b.compute_capability())
    except KdtError:
        return "", "unknown-device"


def _use_timing_cache(config: Any, cache_file: Path | None) -> dict[str, Any]:
    """Load the timing cache into the builder config and say truthfully whether TensorRT took it.

    ``set_timing_cache(..., ignore_mismatch=False)`` returns False for a cache made on another device or
    TensorRT version; then the build starts from an empty cache (and rewrites the file) instead.
    """
    if cache_file is None:
        return {"set": False, "reused": False}
    data = cache_file.read_bytes() if cache_file.is_file() else b""
    ok = bool(config.set_timing_cache(config.create_timing_cache(data), False))
    if ok:
        return {"set": True, "reused": bool(data)}
    note = f"timing cache {cache_file} was not accepted by TensorRT (made on another device or TensorRT version)"
    if data:
        ok = bool(config.set_timing_cache(config.create_timing_cache(b""), False))
        note += "; building with an empty one and rewriting the file" if ok else "; building without one"
    return {"set": ok, "reused": False, "note": note}


def build_engine(onnx: str | os.PathLike[str], profile: Profile, out_dir: str | os.PathLike[str], *, calib_data: str | None = None,
                 precision: str | None = None, timing_cache: str | None = None, calib_cache: str | None = None,
                 log: Any = None, input_key: str = "") -> Artifact:
    """Build a TensorRT engine for ``profile`` from ``onnx`` (a file or an onnx artifact folder) into ``out_dir``.

    ``input_key`` is the compress build stage's skip key (empty for the ``build`` command)."""
    import onnx as onnx_lib

    from kdtoolkit.artifact import Artifact, ArtifactWriter
    from kdtoolkit.engine import cuda_mem
    from kdtoolkit.quant.qdq_rules import has_qdq

    say = log or (lambda msg: None)
    src_path, parents, meta = _resolve_onnx(onnx)
    if not profile.is_tensorrt:  # a usage error (exit 2) before the missing-TensorRT one (exit 3)
        raise InputError(f"profile {profile.name} has backend {profile.backend}; `build` makes TensorRT engines: pick a tensorrt profile")
    load_tensorrt()
    version = installed_version()
    path = build_path(version)
    model = onnx_lib.load(str(src_path))
    qdq = has_qdq(model)
    device, device_key = _device_identity()
    cfg = resolve_config(profile, has_qdq=qdq, precision=precision, timing_cache=timing_cache, calib_cache=calib_cache, trt_path=path,
                         device_key=device_key)
    if calib_cache and not Path(calib_cache).is_file():
        raise InputError(f"calibration cache not found: {calib_cache}")
    strip = False
    if cfg.dla_core is not None:
        # below 11, DLA INT8 is implicit: a Q/DQ ONNX goes in stripped, its scales as a calibration cache
        strip = dla_plan(path, precision=cfg.precision, has_qdq=qdq, calib_cache=bool(calib_cache) or qdq)["strip_qdq"]
    if path.strongly_typed and cfg.precision == "int8" and not qdq:
        raise InputError(f"TensorRT {version} is strongly typed: INT8 needs a Q/DQ ONNX (kdtoolkit quantize), got one without Q/DQ; "
                         "or build with --precision fp16")
    gi = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    in_shape = tuple(d.dim_value for d in gi[0].type.tensor_type.shape.dim[1:]) if gi else ()
    logger = trt.Logger(trt.Logger.WARNING)
    mem: CudaBackend | None = None
    calibrator: trt.IInt8EntropyCalibrator2 | None = None
    free_calibrator: Callable[[], None] = lambda: None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdt-build-") as tmpd:
        onnx_for_build = Path(src_path)
        notes: dict[str, Any] = {}
        if strip:
            from kdtoolkit.engine.calib_cache import write_calibration_cache_from_qdq

            own_cache = Path(tmpd) / "from_qdq.cache"
            info = write_calibration_cache_from_qdq(src_path, own_cache, Path(tmpd) / "model_noqdq.onnx", tensorrt_version=version)
            onnx_for_build, qdq = Path(tmpd) / "model_noqdq.onnx", False
            if not cfg.calib_cache:
                cfg = cfg.model_copy(update={"calib_cache": str(own_cache)})
            notes["dla_int8"] = {"route": "Q/DQ stripped, scales from a calibration cache (TensorRT < 11 has no explicit INT8 on DLA)",
                                 "calibration_cache": "given" if calib_cache else "written here from the Q/DQ scales",
                                 **{k: info[k] for k in ("activation_scales", "propagated", "weights_dequantized")}}
            say(f"[build] DLA below TensorRT 11: Q/DQ stripped, {info['activation_scales']} activation scales from the calibration cache")
        if path.strongly_typed and cfg.precision == "fp16" and not qdq:
            onnx_for_build = Path(tmpd) / "model.fp16.onnx"
            notes["fp16_conversion"] = convert_onnx_fp16(src_path, onnx_for_build)
            say(f"[build] converted the ONNX to FP16 ({notes['fp16_conversion']}), IO kept fp32")
        builder = trt.Builder(logger)
        flags = 0
        if path.explicit_batch_flag:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if path.strongly_typed and typed_flag is not None:  # >= 11 networks are strongly typed; the flag may be gone
            flags |= 1 << int(typed_flag)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_for_build.read_bytes(), str(onnx_for_build)):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
            raise CheckFailed(f"TensorRT {version} cannot parse {src_path}: {errs[0] if errs else 'unknown error'}{more}; "
                              f"`kdtoolkit check {src_path} --profile {profile.name}` lists what it rejects")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
        if path.builder_optimization_level:
            config.builder_optimization_level = cfg.builder_optimization_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        opt = builder.create_optimization_profile()
        io_profile: dict[str, Any] = {}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            mn, op, mx = _profile_shapes(_io_shape(t.shape), cfg, t.name)
            opt.set_shape(t.name, trt.Dims(list(mn)), trt.Dims(list(op)), trt.Dims(list(mx)))
            io_profile[t.name] = {"min": list(mn), "opt": list(op), "max": list(mx)}
        config.add_optimization_profile(opt)
        cache_file = Path(cfg.timing_cache) if cfg.timing_cache else None
        timing = _use_timing_cache(config, cache_file)
        if timing.get("note"):
            say(f"[build] {timing['note']}")
        calib_out: Path | None = None
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if cfg.precision == "fp32" and tf32 is not None:
            config.clear_flag(tf32)  # TF32 is on by default on Ampere and newer: fp32 means fp32 here
        if path.precision_flags:
            if cfg.precision in ("fp16", "int8"):
                config.set_flag(trt.BuilderFlag.FP16)
            if cfg.precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)
                if not qdq:
                    calib_out = Path(tmpd) / "calibration.cache"
                    if cfg.calib_cache:
                        calib_out.write_bytes(Path(cfg.calib_cache).read_bytes())
                    arrays = None
                    if calib_data:
                        arrays = calibration_arrays(calib_data, in_shape, limit=cfg.calib_size, meta=meta)
                        mem = cuda_mem.backend()
                    elif not cfg.calib_cache:
                        raise InputError("INT8 from an ONNX without Q/DQ needs calibration: give --calib-data (a dataset or a .npy of "
                                         "preprocessed N,C,H,W inputs) or --calib-cache, or a Q/DQ ONNX, or --precision fp16")
                    calib_bs = min(cfg.calib_batch_size, len(arrays)) if arrays is not None and len(arrays) else cfg.calib_batch_size
                    cfg = cfg.model_copy(update={"calib_batch_size": calib_bs})
                    calibrator, free_calibrator = _make_calibrator(arrays, calib_bs, calib_out, mem)
                    config.int8_calibrator = calibrator
                    cal = builder.create_optimization_profile()
                    for name, shp in io_profile.items():
                        s = (cfg.calib_batch_size, *shp["opt"][1:])
                        cal.set_shape(name, trt.Dims(list(s)), trt.Dims(list(s)), trt.Dims(list(s)))
                    config.set_calibration_profile(cal)
        dla_layers: dict[str, list[str]] = {}
        if cfg.dla_core is not None:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = cfg.dla_core
            if cfg.gpu_fallback:
                config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                dla_layers.setdefault("dla" if config.can_run_on_DLA(layer) else "gpu", []).append(layer.name)
            if dla_layers.get("gpu") and not cfg.gpu_fallback:
                raise CheckFailed(f"{len(dla_layers['gpu'])} layer(s) cannot run on DLA and gpu_fallback is false, "
                                  f"e.g. {dla_layers['gpu'][0]}")
        say(f"[build] {path.describe()}; precision {cfg.precision}; batch {cfg.batch_min}/{cfg.batch_opt}/{cfg.batch_max}")
        try:
            plan = builder.build_serialized_network(network, config)
        finally:
            free_calibrator()
        if plan is None:
            raise CheckFailed(f"TensorRT {version} failed to build an engine from {src_path} (its log above says why)")
        build_s = time.perf_counter() - started
        plan_bytes = bytes(memoryview(plan))
        if cache_file is not None and timing["set"]:
            fsutil.write_bytes(cache_file, bytes(memoryview(config.get_timing_cache().serialize())))
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan_bytes)
        if engine is None:
            raise CheckFailed("the engine TensorRT just built does not deserialize")
        report = _layer_report(engine)
        io = engine_io(engine)
        with ArtifactWriter(out_dir, kind="engine", stage="build", config={"profile": profile.name, **cfg.model_dump()},
                            parents=parents, input_key=input_key) as w:
            fsutil.write_bytes(w.path(PLAN_NAME), plan_bytes)  # the raw plan: no header of ours
            fsutil.write_json(w.path("layers.json"), report["layers"])
            if calib_out is not None and calib_out.is_file():
                fsutil.write_bytes(w.path("calibration.cache"), calib_out.read_bytes())
            w.info.update({
                "plan": PLAN_NAME, "format": "raw TensorRT plan (IHostMemory bytes), no header", "io": io,
                "optimization_profile": io_profile, "model": meta, "source_onnx": str(src_path),
                "tensorrt": {"version": version, "build_path": path.as_dict(), "device": device,
                             "note": "an engine runs only on this GPU model with this TensorRT version"},
                "precision": cfg.precision, "precision_reason": cfg.precision_reason,
                "timing_cache": {"path": cfg.timing_cache, "device_key": device_key, **timing},
                "dla": {"core": cfg.dla_core, "gpu_fallback": cfg.gpu_fallback, "layers_on_dla": dla_layers.get("dla", []),
                        "layers_on_gpu": dla_layers.get("gpu", []), "inspector_dla_layers": report["dla_layers"]} if cfg.dla_core is not None else None,
                "layers": {"n": report["n_layers"], "file": "layers.json"}, **notes,
            })
            w.metrics.update({"build_time_s": round(build_s, 3), "plan_bytes": len(plan_bytes)})
    assert isinstance(w.artifact, Artifact)
    return w.artifact


def _resolve_onnx(onnx: str | os.PathLike[str]) -> tuple[Path, list[Any], dict[str, Any]]:
    from kdtoolkit.artifact import Artifact

    p = Path(onnx)
    if p.is_dir():
        art = Artifact.load(p)
        src = art.file("model.onnx") if "model.onnx" in art.manifest.files else art.first_file(".onnx")  # not model_noqdq.onnx
        return src, [art], dict(art.info.get("model", {}))
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    if Artifact.is_artifact(p.parent):
        art = Artifact.load(p.parent)
        return p, [art], dict(art.info.get("model", {}))
    return p, [], {}


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

    Use as a context manager. A batch outside the engine's optimisation profile is an InputError.
    """

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
        from kdtoolkit.engine import cuda_mem

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


def _shell_quote(s: str) -> str:
    import shlex

    return s if s == CALIB_DATA_ARG else shlex.quote(s)


# implicit INT8 without a cache calibrates on the device from data given there: never a path of the machine
# that wrote the commands (it does not exist on the device)
CALIB_DATA_ARG = '"${CALIB_DATA:?set CALIB_DATA to calibration images on this device (ImageFolder, .npz or .npy)}"'


def build_commands(onnx_path: str | os.PathLike[str], profile: Profile, *, calib_data: str | None = None,
                   onnx_name: str = "model.onnx", calib_cache_name: str | None = None, stripped_onnx_name: str | None = None,
                   plan_name: str = "model.plan", engine_dir: str = "engine") -> dict[str, Any]:
    """The exact on-device commands for a TensorRT profile: `kdtoolkit build` and its trtexec equivalent (8.5 .. 10.x).

    The trtexec line never asks for INT8 it cannot get right: a Q/DQ ONNX is explicit INT8 (plus FP16 for
    the layers left in float, as `kdtoolkit build` sets both); an ONNX without Q/DQ is INT8 only with a
    calibration cache that exists (trtexec's ``--int8`` alone uses placeholder ranges and ``--calib=FILE``
    with FILE missing calibrates on random data), else FP16, and says so. DLA below TensorRT 11 builds the
    Q/DQ-free ONNX with the cache written from the Q/DQ scales. ``calib_data`` (the run's data source) is
    only named in a note: the device needs its own path (``$CALIB_DATA``).
    """
    import onnx as onnx_lib

    from kdtoolkit.quant.qdq_rules import has_qdq

    model = onnx_lib.load(str(onnx_path))
    qdq = has_qdq(model)
    cfg = resolve_config(profile, has_qdq=qdq, timing_cache="timing.cache")
    oldest = build_path(profile.tensorrt.min_version) if profile.tensorrt is not None else build_path("8.5")
    dla = cfg.dla_core is not None
    int8 = cfg.precision == "int8"
    strip = bool(int8 and dla and qdq and not oldest.strongly_typed and calib_cache_name and stripped_onnx_name)
    implicit = bool(int8 and (not qdq or strip))
    kd = ["kdtoolkit", "build", onnx_name, "--profile", profile.name, "--out", engine_dir]
    if int8 and calib_cache_name:
        kd += ["--calib-cache", calib_cache_name]
    elif int8 and not qdq:
        kd += ["--calib-data", CALIB_DATA_ARG]
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    # --memPoolSize: the number alone is MiB everywhere; a unit suffix is misread by trtexec 10.0 (MiB x suffix)
    te = ["trtexec", f"--onnx={stripped_onnx_name if strip else onnx_name}", f"--saveEngine={plan_name}",
          f"--memPoolSize=workspace:{cfg.workspace_mb}", "--timingCacheFile=timing.cache"]
    if oldest.builder_optimization_level:
        te.append(f"--builderOptimizationLevel={cfg.builder_optimization_level}")  # trtexec >= 8.6
    if dims and dims[0] == -1:
        try:
            mn, op, mx = _profile_shapes(dims, cfg, inp.name)
        except InputError:  # shapes the profile cannot take: `check` reports them; trtexec then needs them by hand
            mn = op = mx = tuple(dims)
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        te += [f"--minShapes={inp.name}:{shape(mn)}", f"--optShapes={inp.name}:{shape(op)}", f"--maxShapes={inp.name}:{shape(mx)}"]
    shapes = None
    if dims and dims[0] == -1:
        shapes = {inp.name: {"min": list(mn), "opt": list(op), "max": list(mx)}}
    te_precision = cfg.precision
    note = ""
    if int8 and implicit and not calib_cache_name:
        te_precision = "fp16"
        note = ("trtexec cannot calibrate from data and no calibration cache comes with this ONNX, so its line builds FP16; "
                "for INT8 run `kdtoolkit build` with CALIB_DATA set" + (f" (the run calibrated from {calib_data!r})" if calib_data else ""))
    if te_precision in ("fp16", "int8"):
        te.append("--fp16")
    if te_precision == "int8":
        te.append("--int8")
        if implicit:
            te.append(f"--calib={calib_cache_name}")
    if dla:
        te.append(f"--useDLACore={cfg.dla_core}")
        if cfg.gpu_fallback:
            te.append("--allowGPUFallback")
    return {"kdtoolkit": " ".join(_shell_quote(a) for a in kd), "trtexec": " ".join(_shell_quote(a) for a in te),
            "precision": cfg.precision, "trtexec_precision": te_precision, "implicit_int8": str(implicit),
            "calibration_cache": calib_cache_name or "", "onnx_for_trtexec": (stripped_onnx_name or onnx_name) if strip else onnx_name,
            "stripped_onnx": stripped_onnx_name if strip and stripped_onnx_name else "",
            "note": note,
            # what deploy/device_report.py builds with (TensorRT's Python API, no kdtoolkit on the device)
            "build": {"onnx": (stripped_onnx_name or onnx_name) if strip else onnx_name, "precision": cfg.precision,
                      "qdq": qdq and not strip, "calibration_cache": calib_cache_name if implicit and calib_cache_name else None,
                      "dla_core": cfg.dla_core, "gpu_fallback": cfg.gpu_fallback, "workspace_mb": cfg.workspace_mb,
                      "shapes": shapes}}


def build_script(cmds: dict[str, str], profile: Profile, counts: dict[str, int]) -> str:
    """build_on_device.sh: kdtoolkit build when installed, else the trtexec equivalent."""
    notes = []
    if cmds.get("calibration_cache"):
        notes.append(f"# implicit INT8: both lines read the calibration cache {cmds['calibration_cache']} (scales from the Q/DQ ONNX)"
                     + (f";\n# trtexec builds {cmds['stripped_onnx']}, the same graph without Q/DQ nodes" if cmds.get("stripped_onnx") else ""))
    elif cmds["implicit_int8"] == "True":
        notes.append("# implicit INT8: kdtoolkit build calibrates on the device from CALIB_DATA (set it to calibration images here)")
    if cmds.get("note"):
        notes.append("# " + cmds["note"])
    note = "".join(n + "\n" for n in notes)
    te_args = cmds["trtexec"].split(" ", 1)[1]
    return (
        "#!/usr/bin/env bash\n"
        f"# Build the TensorRT engine for profile {profile.name} ON THE TARGET DEVICE: engines are tied to the GPU\n"
        "# and the TensorRT version. Nothing here was built or timed on the machine that wrote this file.\n"
        f"# Static check of model.onnx against the profile: {counts['error']} error(s), {counts['warning']} warning(s) (check.json).\n"
        "# The trtexec line is for TensorRT 8.5 .. 10.x; on TensorRT >= 11 use kdtoolkit build (strongly typed path).\n"
        f"{note}"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        + (f"[ -f {_shell_quote(cmds['calibration_cache'])} ] || {{ echo {_shell_quote('error: ' + cmds['calibration_cache'] + ' is missing; without it trtexec would calibrate on random data')} >&2; exit 2; }}\n"
           if cmds.get("calibration_cache") else "")
        + 'if command -v kdtoolkit >/dev/null 2>&1 && [ "${USE_TRTEXEC:-0}" != 1 ]; then\n'
        f"  {cmds['kdtoolkit']}\n"
        "else\n"
        '  TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"\n'
        + (f"  echo {_shell_quote('note: ' + cmds['note'])} >&2\n" if cmds.get("note") else "")
        + f"  \"$TRTEXEC\" {te_args}\n"
        "fi\n"
    )
