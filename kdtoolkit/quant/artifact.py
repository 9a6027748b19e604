"""The quantize artifact: one function writes it for stage 05-quantize and for ``kdtoolkit quantize``.

``write_quantized`` makes the INT8 QDQ model with :func:`kdtoolkit.quant.ptq.build_int8`, times FP32 and INT8
interleaved on ONNX Runtime (not for TensorRT targets: TensorRT decides speed on the device), records the
FP32-vs-INT8 decision (:func:`kdtoolkit.quant.schemes.pick_precision`) and ships the chosen model as
``model.onnx`` with ``int8.onnx`` beside it. Both callers therefore write the same manifest shape:
info ``model``, ``opset``, ``input``, ``output``, ``precision``, ``quantization``; metrics from ``build_int8``
plus ``precision``, ``precision_reason``, ``precision_decided_at_batch``, ``accuracy_runtime``, the latency keys
when timed, and ``stage_wall_s``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from kdtoolkit.artifact import Artifact, ArtifactWriter
from kdtoolkit.progress import log


def write_quantized(
    out_dir: Path,
    fp32: Path,
    splits: Any,
    profile: Any,
    int8_cfg: Any,
    *,
    config: dict[str, Any],
    scheme: Any = None,
    policy: str | None = None,
    asked_by: str | None = None,
    measure: Any = None,
    parents: list[Artifact] | None = None,
    input_key: str = "",
    info: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    student: Any = None,
    teacher: Any = None,
    qat_cfg: Any = None,
    loss: Any = None,
    work: Path | None = None,
    progress: bool = False,
) -> Artifact:
    """Write the quantize artifact of ``fp32`` (an FP32 ONNX file) at ``out_dir`` for target ``profile``.

    ``int8_cfg`` is a :class:`kdtoolkit.config.Int8Config`; ``scheme`` defaults to the profile's. ``policy``
    (default: the profile's precision) is fp32/fp16 (no INT8 made), int8 (INT8 shipped, its speed noted) or
    auto (the faster one within the accuracy tolerance); ``asked_by`` names who asked for a policy other
    than the profile's, and the recorded reason says so. ``measure`` (a :class:`kdtoolkit.config.MeasureConfig`,
    default its defaults) sets the ORT timing. ``info``/``metrics`` are carried into the manifest first
    (the export's model description and params); ``student``/``teacher``/``qat_cfg``/``loss``/``work`` are for QAT."""
    from kdtoolkit.config import MeasureConfig
    from kdtoolkit.quant.ptq import build_int8
    from kdtoolkit.quant.schemes import pick_precision, scheme_for

    t0 = time.perf_counter()
    prof = profile
    policy = policy or prof.precision
    fp32 = Path(fp32)
    with ArtifactWriter(out_dir, kind="onnx", stage="quantize", config=config, parents=parents or [], input_key=input_key) as w:
        w.info.update(info or {})
        w.metrics.update(metrics or {})
        if policy in ("fp32", "fp16"):
            shutil.copyfile(fp32, w.path("model.onnx"))
            w.info["precision"] = "fp32"
            reason = f"{'profile' if asked_by is None else asked_by} precision is {policy}; no INT8 made" + \
                (" (FP16 conversion happens at the engine build)" if policy == "fp16" else "")
            w.metrics["precision_reason"] = reason  # no "precision" metric: an FP16 target's precision is the engine build's
            _describe_io(w.info, w.path("model.onnx"))
            return w.commit()
        scheme = scheme or scheme_for(prof)
        outs = (info or {}).get("outputs") or {}
        names = outs.get("names") if outs.get("kind") == "raw" else None  # not class logits: fidelity, no top-1
        res = build_int8(fp32, w.path("int8.onnx"), splits, scheme, int8_cfg, student=student, teacher=teacher, qat_cfg=qat_cfg,
                         loss=loss, work=work, progress=progress, output_names=names)
        w.info["quantization"] = res["info"]
        w.metrics.update(res["metrics"])
        lat, batch = None, prof.batch.opt
        if not prof.is_tensorrt:
            lat, batch = _time_fp32_int8(fp32, w.path("int8.onnx"), prof, measure or MeasureConfig(), progress=progress)
            if lat is not None:
                w.metrics["precision_latency_ms"] = lat
                w.metrics["int8_speedup"] = {bb: lat["fp32"][bb]["p50"] / lat["int8"][bb]["p50"] for bb in lat["fp32"]}
        b = str(batch)
        precision, reason = pick_precision(
            policy, fp32_ms=lat["fp32"][b]["p50"] if lat else None, int8_ms=lat["int8"][b]["p50"] if lat else None,
            fp32_acc=res["metrics"]["accuracy_fp32"], int8_acc=res["metrics"]["accuracy_int8"],
            tolerance_points=prof.accuracy_tolerance, batch=batch, tensorrt=prof.is_tensorrt,
            by_batch={int(bb): (lat["fp32"][bb]["p50"], lat["int8"][bb]["p50"]) for bb in lat["fp32"]} if lat else None,
            fidelity=res["metrics"].get("output_fidelity_text"))
        if asked_by is not None and policy != prof.precision:
            reason = reason.replace(f"profile precision is {policy}", f"{asked_by} asks for {policy}", 1)
        shutil.copyfile(w.path("int8.onnx") if precision == "int8" else fp32, w.path("model.onnx"))
        w.info["precision"] = precision
        _describe_io(w.info, w.path("model.onnx"))
        w.metrics.update({"precision": precision, "precision_reason": reason, "precision_decided_at_batch": batch,
                          "accuracy_runtime": "onnxruntime-cpu" + (" (proxy for TensorRT)" if prof.is_tensorrt else "")})
        w.metrics["stage_wall_s"] = round(time.perf_counter() - t0, 1)
        log(f"[quantize] shipping {precision}: {reason}", enabled=progress)
    return w.artifact


def _time_fp32_int8(fp32: Path, int8: Path, prof: Any, m: Any, *, progress: bool) -> tuple[dict[str, Any] | None, int]:
    """FP32 and INT8 timed interleaved on ORT at every measured batch inside the profile's range and its opt
    batch (which decides); a batch the model's static input refuses is left out. (latency or None, deciding batch)."""
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.latency.timing import measure

    threads = prof.onnxruntime.intra_op_threads
    with OrtRunner(fp32, name="fp32", threads=threads) as a, OrtRunner(int8, name="int8", threads=threads) as b:
        bs = sorted(x for x in {x for x in m.batches if prof.batch.min <= x <= prof.batch.max} | {prof.batch.opt}
                    if a.allowed_batch(x) and b.allowed_batch(x))
        if not bs:
            return None, prof.batch.opt
        log(f"[quantize] timing FP32 and INT8 interleaved at batch {bs} (ONNX Runtime)", enabled=progress)
        res = measure([a, b], bs, warmup=m.warmup, iters=m.iters)
    lat = {n: {str(bb): {k: v for k, v in st.items() if k != "samples_ms"} for bb, st in per.items()} for n, per in res.items()}
    return lat, prof.batch.opt if prof.batch.opt in bs else bs[0]


def _describe_io(info: dict[str, Any], path: Path) -> None:
    """opset, input and output of the shipped file, unless the caller carried them in (the stage carries the export's)."""
    for k, v in _io_info(path).items():
        info.setdefault(k, v)


def _io_info(path: Path) -> dict[str, Any]:
    """opset, input and output of the shipped ONNX file, described as the export artifact describes them."""
    import onnx

    from kdtoolkit.export.onnx_export import opset_of

    m = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in init)
    dims = [[d.dim_value if d.dim_value > 0 else (d.dim_param or "batch") for d in v.type.tensor_type.shape.dim]
            for v in (inp, m.graph.output[0])]
    return {"opset": opset_of(m), "input": {"name": inp.name, "shape": dims[0], "dtype": "float32"},
            "output": {"name": m.graph.output[0].name, "shape": dims[1], "dtype": "float32"}}
