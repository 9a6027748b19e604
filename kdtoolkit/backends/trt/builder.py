"""TensorRT engine builder for TensorRT 8.5 .. 11, written against the public Python API.

One builder reads the installed version and takes the path :func:`kdtoolkit.backends.trt.version.build_path` chose:
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdtoolkit import fsutil
from kdtoolkit.backends.trt.calibrator import _make_calibrator, calibration_arrays
from kdtoolkit.backends.trt.config import BuildConfig, _profile_shapes, gpu_cache_key, resolve_config
from kdtoolkit.backends.trt.lazy import PLAN_NAME, installed_version, load_tensorrt
from kdtoolkit.backends.trt.runner import _io_shape, engine_io
from kdtoolkit.backends.trt.version import BuildPath, build_path, dla_plan
from kdtoolkit.errors import CheckFailed, InputError, MissingDependency

if TYPE_CHECKING:
    import tensorrt as trt

    from kdtoolkit.artifact import Artifact
    from kdtoolkit.backends.trt.cuda_mem import CudaBackend
    from kdtoolkit.targets import Profile
else:
    from kdtoolkit.backends.trt.lazy import trt


def _nothing() -> None:
    pass


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


def _device_identity() -> tuple[str, str]:
    """(GPU name, cache key) of the current device through the CUDA adapter; ('', 'unknown-device') without one."""
    from kdtoolkit.backends.trt import cuda_mem
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


@dataclass
class _Plan:
    """What a build was resolved to before TensorRT runs (step 1 of build_engine)."""

    src_path: Path
    parents: list[Any]
    meta: dict[str, Any]
    version: str
    path: BuildPath
    qdq: bool
    device: str
    device_key: str
    cfg: BuildConfig
    strip: bool
    in_shape: tuple[int, ...]


def build_engine(onnx: str | os.PathLike[str], profile: Profile, out_dir: str | os.PathLike[str], *, calib_data: str | None = None,
                 precision: str | None = None, timing_cache: str | None = None, calib_cache: str | None = None,
                 log: Any = None, input_key: str = "", on_bad_image: str = "fail") -> Artifact:
    """Build a TensorRT engine for ``profile`` from ``onnx`` (a file or an onnx artifact folder) into ``out_dir``.

    Steps: resolve the build (version, path, precision, shapes), prepare the ONNX (strip Q/DQ for DLA, convert
    to FP16 for strongly typed TensorRT), parse, configure (workspace, profiles, timing cache, precision flags and
    calibration, DLA), build, and write the raw plan with its manifest. ``input_key`` is the compress build
    stage's skip key (empty for the ``build`` command)."""
    say = log or (lambda msg: None)
    plan = _resolve_build(onnx, profile, precision=precision, timing_cache=timing_cache, calib_cache=calib_cache)
    logger = trt.Logger(trt.Logger.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdt-build-") as tmpd:
        onnx_for_build, notes = _prepare_onnx(plan, Path(tmpd), given_cache=bool(calib_cache), say=say)
        builder = trt.Builder(logger)
        network = _parse(builder, logger, plan, onnx_for_build, profile)
        config = builder.create_builder_config()
        io_profile, cache_file, timing = _configure(builder, network, config, plan, say=say)
        calib_out, free_calibrator = _configure_precision(builder, config, plan, io_profile, Path(tmpd), calib_data, on_bad_image)
        dla_layers = _configure_dla(network, config, plan.cfg)
        cfg = plan.cfg
        say(f"[build] {plan.path.describe()}; precision {cfg.precision}; batch {cfg.batch_min}/{cfg.batch_opt}/{cfg.batch_max}")
        try:
            serialized = builder.build_serialized_network(network, config)
        finally:
            free_calibrator()
        if serialized is None:
            raise CheckFailed(f"TensorRT {plan.version} failed to build an engine from {plan.src_path} (its log above says why)")
        build_s = time.perf_counter() - started
        plan_bytes = bytes(memoryview(serialized))
        if cache_file is not None and timing["set"]:
            fsutil.write_bytes(cache_file, bytes(memoryview(config.get_timing_cache().serialize())))
        return _write_engine(out_dir, plan, plan_bytes, logger, profile, io_profile, timing, calib_out, dla_layers, notes, build_s,
                             input_key)


def _resolve_build(onnx: str | os.PathLike[str], profile: Profile, *, precision: str | None, timing_cache: str | None,
                   calib_cache: str | None) -> _Plan:
    """Step 1: the ONNX, the installed TensorRT and its build path, the resolved BuildConfig; refusals in one line."""
    import onnx as onnx_lib

    from kdtoolkit.quant.qdq_rules import has_qdq

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
    return _Plan(Path(src_path), parents, meta, version, path, qdq, device, device_key, cfg, strip, in_shape)


def _prepare_onnx(plan: _Plan, tmpd: Path, *, given_cache: bool, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """Step 2: the ONNX TensorRT parses: Q/DQ stripped for DLA below 11 (scales into a calibration cache),
    converted to FP16 for strongly typed TensorRT; returns it and the notes for the manifest."""
    onnx_for_build = plan.src_path
    notes: dict[str, Any] = {}
    if plan.strip:
        from kdtoolkit.backends.trt.calib_cache import write_calibration_cache_from_qdq

        own_cache = tmpd / "from_qdq.cache"
        info = write_calibration_cache_from_qdq(plan.src_path, own_cache, tmpd / "model_noqdq.onnx", tensorrt_version=plan.version)
        onnx_for_build, plan.qdq = tmpd / "model_noqdq.onnx", False
        if not plan.cfg.calib_cache:
            plan.cfg = plan.cfg.model_copy(update={"calib_cache": str(own_cache)})
        notes["dla_int8"] = {"route": "Q/DQ stripped, scales from a calibration cache (TensorRT < 11 has no explicit INT8 on DLA)",
                             "calibration_cache": "given" if given_cache else "written here from the Q/DQ scales",
                             **{k: info[k] for k in ("activation_scales", "propagated", "weights_dequantized")}}
        say(f"[build] DLA below TensorRT 11: Q/DQ stripped, {info['activation_scales']} activation scales from the calibration cache")
    if plan.path.strongly_typed and plan.cfg.precision == "fp16" and not plan.qdq:
        onnx_for_build = tmpd / "model.fp16.onnx"
        notes["fp16_conversion"] = convert_onnx_fp16(plan.src_path, onnx_for_build)
        say(f"[build] converted the ONNX to FP16 ({notes['fp16_conversion']}), IO kept fp32")
    return onnx_for_build, notes


def _parse(builder: trt.Builder, logger: trt.Logger, plan: _Plan, onnx_for_build: Path, profile: Profile) -> trt.INetworkDefinition:
    """Step 3: the network from the ONNX parser (explicit batch below 10, strongly typed from 11)."""
    flags = 0
    if plan.path.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    typed_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if plan.path.strongly_typed and typed_flag is not None:  # >= 11 networks are strongly typed; the flag may be gone
        flags |= 1 << int(typed_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_for_build.read_bytes(), str(onnx_for_build)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
        raise CheckFailed(f"TensorRT {plan.version} cannot parse {plan.src_path}: {errs[0] if errs else 'unknown error'}{more}; "
                          f"`kdtoolkit check {plan.src_path} --profile {profile.name}` lists what it rejects")
    # the parser owns nothing the network needs after parsing (TensorRT's samples drop it the same way)
    return network


def _configure(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig, plan: _Plan, *,
               say: Callable[[str], None]) -> tuple[dict[str, Any], Path | None, dict[str, Any]]:
    """Step 4: workspace, optimisation level, the optimisation profile of every input, the timing cache."""
    cfg = plan.cfg
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    if plan.path.builder_optimization_level:
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
    return io_profile, cache_file, timing


def _configure_precision(builder: trt.Builder, config: trt.IBuilderConfig, plan: _Plan, io_profile: dict[str, Any], tmpd: Path,
                         calib_data: str | None, on_bad_image: str = "fail") -> tuple[Path | None, Callable[[], None]]:
    """Step 5: precision flags below 11 (TF32 off for fp32), and for implicit INT8 the entropy calibrator with its
    calibration profile; returns the calibration cache it writes and the calibrator's release function."""
    from kdtoolkit.backends.trt import cuda_mem

    cfg, path = plan.cfg, plan.path
    calib_out: Path | None = None
    free_calibrator: Callable[[], None] = _nothing
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if cfg.precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)  # TF32 is on by default on Ampere and newer: fp32 means fp32 here
    if not path.precision_flags:
        return calib_out, free_calibrator
    if cfg.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if cfg.precision != "int8":
        return calib_out, free_calibrator
    config.set_flag(trt.BuilderFlag.INT8)
    if plan.qdq:
        return calib_out, free_calibrator
    calib_out = tmpd / "calibration.cache"
    if cfg.calib_cache:
        calib_out.write_bytes(Path(cfg.calib_cache).read_bytes())
    arrays = None
    mem: CudaBackend | None = None
    if calib_data:
        arrays = calibration_arrays(calib_data, plan.in_shape, limit=cfg.calib_size, meta=plan.meta, on_bad_image=on_bad_image)
        mem = cuda_mem.backend()
    elif not cfg.calib_cache:
        raise InputError("INT8 from an ONNX without Q/DQ needs calibration: give --calib-data (a dataset or a .npy of "
                         "preprocessed N,C,H,W inputs) or --calib-cache, or a Q/DQ ONNX, or --precision fp16")
    calib_bs = min(cfg.calib_batch_size, len(arrays)) if arrays is not None and len(arrays) else cfg.calib_batch_size
    plan.cfg = cfg = cfg.model_copy(update={"calib_batch_size": calib_bs})
    calibrator, free_calibrator = _make_calibrator(arrays, calib_bs, calib_out, mem)
    config.int8_calibrator = calibrator
    cal = builder.create_optimization_profile()
    for name, shp in io_profile.items():
        s = (cfg.calib_batch_size, *shp["opt"][1:])
        cal.set_shape(name, trt.Dims(list(s)), trt.Dims(list(s)), trt.Dims(list(s)))
    config.set_calibration_profile(cal)
    return calib_out, free_calibrator


def _configure_dla(network: trt.INetworkDefinition, config: trt.IBuilderConfig, cfg: BuildConfig) -> dict[str, list[str]]:
    """Step 6: DLA core and GPU fallback; which layers DLA can take (a refusal without fallback)."""
    dla_layers: dict[str, list[str]] = {}
    if cfg.dla_core is None:
        return dla_layers
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
    return dla_layers


def _write_engine(out_dir: str | os.PathLike[str], plan: _Plan, plan_bytes: bytes, logger: trt.Logger, profile: Profile,
                  io_profile: dict[str, Any], timing: dict[str, Any], calib_out: Path | None, dla_layers: dict[str, list[str]],
                  notes: dict[str, Any], build_s: float, input_key: str) -> Artifact:
    """Step 7: check the plan deserialises, then write it raw (no header of ours) with its manifest."""
    from kdtoolkit.artifact import Artifact, ArtifactWriter

    cfg = plan.cfg
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise CheckFailed("the engine TensorRT just built does not deserialize")
    report = _layer_report(engine)
    io = engine_io(engine)
    with ArtifactWriter(out_dir, kind="engine", stage="build", config={"profile": profile.name, **cfg.model_dump()},
                        parents=plan.parents, input_key=input_key) as w:
        fsutil.write_bytes(w.path(PLAN_NAME), plan_bytes)  # the raw plan: no header of ours
        fsutil.write_json(w.path("layers.json"), report["layers"])
        if calib_out is not None and calib_out.is_file():
            fsutil.write_bytes(w.path("calibration.cache"), calib_out.read_bytes())
        w.info.update({
            "plan": PLAN_NAME, "format": "raw TensorRT plan (IHostMemory bytes), no header", "io": io,
            "optimization_profile": io_profile, "model": plan.meta, "source_onnx": str(plan.src_path),
            "tensorrt": {"version": plan.version, "build_path": plan.path.as_dict(), "device": plan.device,
                         "note": "an engine runs only on this GPU model with this TensorRT version"},
            "precision": cfg.precision, "precision_reason": cfg.precision_reason,
            "timing_cache": {"path": cfg.timing_cache, "device_key": plan.device_key, **timing},
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
