"""Choose the student by latency measured on the target's backend, not by FLOPs.

Candidates (depth x width, separable) are exported to ONNX and timed interleaved with the
teacher in one process (ONNX Runtime with spinning off). For a TensorRT profile on a machine
without TensorRT the ONNX Runtime CPU figure is a labelled proxy. Among the candidates whose p50
at the profile's opt batch meets the budget, the most capable one (most MACs, then parameters)
wins; the table of everything tried is returned.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError
from kdtoolkit.student.build import StudentConfig, count_macs, count_params, make_student

DEPTHS = (1.0, 0.67, 0.34)
WIDTHS = (1.0, 0.75, 0.5, 0.35, 0.25)  # the narrow end is for teachers that are already separable
INT8_EXTRA_DEPTHS = (0.12,)  # one block per stage of a ResNet-56: where a standard-conv student meets 10x in INT8
VIT_DEPTHS = (1.0, 0.75, 0.5, 0.34, 0.25)  # a transformer's blocks are its main cost: finer steps than a CNN's stages
# INT8 also brings late-heavy shapes: the fewest blocks in every stage but the last, which keeps this fraction of its own.
# ORT's INT8 kernels run a wide, low-resolution stage far faster than a narrow, high-resolution one of the same MACs: on a
# ResNet-56, keeping 0/1/4 blocks per stage gives 3.9x the parameters of 1/1/1 and is faster at batch 64 in INT8
# (benchmarks/results/student_shape.json).
LATE_FRACTIONS = (0.12, 0.23, 0.34, 0.45, 0.56, 0.67, 1.0)


def late_heavy_plans(model: Any, input_shape: tuple[int, ...]) -> list[dict[str, int]]:
    """``keep_blocks`` plans that keep the fewest blocks in every stage but the last and a growing share of the last."""
    import torch

    from kdtoolkit.student.transforms import depth_stages

    stages = depth_stages(model, torch.zeros(1, *input_shape[1:]))
    if len(stages) < 2:
        return []
    *early, last = stages
    n, fewest = stages[last]
    return [{**{s: stages[s][1] for s in early}, last: k} for k in sorted({max(1, fewest, round(n * f)) for f in LATE_FRACTIONS})]


def measure_models(models: dict[str, Any], input_shape: tuple[int, ...], batches: list[int], *, threads: int = 0,
                   iters: int = 30, warmup: int = 5, int8_scheme: Any = None,
                   int8_names: set[str] | None = None, int8_mode: str = "auto") -> dict[str, dict[int, dict[str, Any]]]:
    """Export each model to a temp ONNX and time them all interleaved (ONNX Runtime CPU).

    With ``int8_scheme`` the models named in ``int8_names`` are also quantized the way the quantize stage's PTQ does
    (``int8_mode`` resolved per graph as there: QDQ with minmax, or dynamic for a transformer) and timed as
    ``NAME@int8``. Eight random inputs calibrate them: the scales change what INT8 computes, not how fast it runs."""
    import numpy as np

    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.latency.timing import measure

    with tempfile.TemporaryDirectory(prefix="kdt-latency-") as tmp:
        runners = []
        calib = np.random.default_rng(0).standard_normal((8, *input_shape[1:])).astype(np.float32) if int8_scheme else None
        for name, m in models.items():
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(m, input_shape, path)
            runners.append(OrtRunner(path, name=name, threads=threads))
            if int8_scheme is not None and name in (int8_names or set()):
                from kdtoolkit.quant.ptq import quantize_dynamic_onnx, quantize_onnx, resolve_mode

                q = Path(tmp) / f"{name}.int8.onnx"
                if resolve_mode(int8_mode, "onnxruntime", path)[0] == "dynamic":
                    quantize_dynamic_onnx(path, q, int8_scheme)
                else:
                    quantize_onnx(path, q, calib, int8_scheme, method="minmax")
                runners.append(OrtRunner(q, name=f"{name}@int8", threads=threads))
        try:
            return measure(runners, batches, warmup=warmup, iters=iters)
        finally:
            for r in runners:
                r.close()


def latency_table(teacher: Any, student: Any, input_shape: tuple[int, ...], batches: list[int], *, threads: int = 0,
                  iters: int = 30) -> dict[str, Any]:
    """Teacher vs student: params, MACs, measured p50 per batch and speedups (the `student` command's table)."""
    res = measure_models({"teacher": teacher, "student": student}, input_shape, batches, threads=threads, iters=iters)
    out: dict[str, Any] = {}
    for name, m in (("teacher", teacher), ("student", student)):
        out[name] = {
            "params": count_params(m), "macs": count_macs(m, input_shape),
            "latency_ms": {"p50": res[name][batches[0]]["p50"], "p90": res[name][batches[0]]["p90"], "batch": batches[0]},
            "latency_by_batch": {str(b): {k: res[name][b][k] for k in ("p50", "p90", "mean", "std")} for b in batches},
        }
    out["speedup"] = {f"b{b}": res["teacher"][b]["p50"] / res["student"][b]["p50"] for b in batches}
    return out


def search(teacher: Any, base: StudentConfig, *, budget_ms: float | None = None, speedup: float | None = None,
           input_shape: tuple[int, ...], num_classes: int, batch: int, threads: int = 0, iters: int = 30,
           depths: tuple[float, ...] = DEPTHS, widths: tuple[float, ...] = WIDTHS, best_effort: bool = False,
           precision: str = "fp32", int8_scheme: Any = None, int8_mode: str = "auto") -> dict[str, Any]:
    """Try depth x width candidates; return the chosen StudentConfig and the measured table.

    The budget is an absolute p50 (``budget_ms``) or a speedup over the teacher measured in the same
    interleaved run (``speedup``); with both, the stricter one holds.

    ``precision`` is what the profile will ship on this runtime. With ``int8`` or ``auto`` (and ``int8_scheme``) INT8 is
    part of the speed budget: every candidate is also timed as the quantize stage's INT8, and its latency is the INT8
    figure (``int8``) or the faster of the two (``auto``, which ships the faster one). Standard-convolution variants
    join the separable ones then, because ONNX Runtime's INT8 depthwise kernels are slow and a wider standard student
    can meet the budget in INT8 (benchmarks/results/student_shape.json), and so do late-heavy shapes
    (``late_heavy_plans``). The teacher is always timed in FP32."""
    if budget_ms is None and speedup is None:
        raise InputError("the student search needs a latency budget (--latency-budget MS) or a speedup (--speedup X)")
    cands: dict[str, tuple[StudentConfig, Any]] = {}
    why: list[str] = []  # why candidates could not be built: the error names the reason when none could
    from kdtoolkit.student.transformer import is_transformer, refuse_graph_transformer, resolve_shape

    if precision not in ("fp32", "fp16", "int8", "auto"):
        raise InputError(f"unknown precision {precision!r} for the student search")
    int8 = precision in ("int8", "auto") and int8_scheme is not None

    if not base.arch:
        refuse_graph_transformer(teacher.module)
    vit = not base.arch and is_transformer(teacher.module)
    late = int8 and not vit and not base.arch and depths == DEPTHS and not base.keep_blocks
    if vit and depths == DEPTHS:
        depths = VIT_DEPTHS
    elif int8 and depths == DEPTHS:
        depths = DEPTHS + INT8_EXTRA_DEPTHS
    for d in depths:
        for w in widths:
            cfg = base.model_copy(update={"depth": d, "width": w, "latency_budget_ms": None, "speedup": None})
            if vit:  # a ViT: candidates are block x head x MLP counts; fractions that round to the same shape are one
                try:
                    shape = resolve_shape(teacher.module, cfg)
                except InputError as e:
                    why.append(str(e))
                    continue
                name = f"b{shape['blocks']}-h{shape['heads']}-m{shape['mlp_hidden']}"
                if name in cands:
                    continue
                cfg = cfg.model_copy(update={"blocks": shape["blocks"], "heads": shape["heads"], "mlp_hidden": shape["mlp_hidden"]})
                try:
                    model, _, _ = make_student(teacher, cfg, input_shape=input_shape, num_classes=num_classes)
                except InputError as e:
                    why.append(str(e))
                    continue  # the teacher's own shape
                cands[name] = (cfg, model.eval())
                continue
            for sep in ([True, False] if int8 and base.separable else [base.separable]):
                c = cfg if sep == base.separable else cfg.model_copy(update={"separable": sep})
                try:
                    model, _, _ = make_student(teacher, c, input_shape=input_shape, num_classes=num_classes)
                except InputError as e:
                    why.append(str(e))
                    continue  # e.g. no blocks to drop in this architecture, or a standard student that copies the teacher
                cands[f"d{d:g}-w{w:g}" + ("" if sep else "-std")] = (c, model.eval())
    for keep in late_heavy_plans(teacher.module, input_shape) if late else []:
        c = base.model_copy(update={"depth": 1.0, "width": 1.0, "keep_blocks": keep, "separable": False,
                                    "latency_budget_ms": None, "speedup": None})
        try:
            model, _, _ = make_student(teacher, c, input_shape=input_shape, num_classes=num_classes)
        except InputError as e:
            why.append(str(e))
            continue
        cands["keep" + "-".join(str(k) for k in keep.values()) + "-std"] = (c, model.eval())
    if not cands:
        reasons = list(dict.fromkeys(why))  # distinct, first seen first
        raise InputError("no student candidate could be built for the latency search"
                         + (f": {reasons[0]}" if len(reasons) == 1 else f" ({len(reasons)} reasons; the first: {reasons[0]})" if reasons else ""))
    lat = measure_models({"teacher": teacher.module, **{k: m for k, (_, m) in cands.items()}}, input_shape, [batch],
                         threads=threads, iters=iters, int8_scheme=int8_scheme if int8 else None, int8_names=set(cands),
                         int8_mode=int8_mode)
    teacher_p50 = lat["teacher"][batch]["p50"]
    if speedup is not None:
        budget_ms = min(budget_ms or float("inf"), teacher_p50 / speedup)
    assert budget_ms is not None
    rows = []
    for name, (cfg, m) in cands.items():
        p50 = fp32_p50 = lat[name][batch]["p50"]
        timed: dict[str, Any] = {}
        if int8:
            int8_p50 = lat[f"{name}@int8"][batch]["p50"]
            p50 = int8_p50 if precision == "int8" else min(fp32_p50, int8_p50)
            timed = {"p50_fp32_ms": fp32_p50, "p50_int8_ms": int8_p50, "timed_as": "int8" if p50 == int8_p50 else "fp32"}
        rows.append({"name": name, "depth": cfg.depth, "width": cfg.width, "separable": cfg.separable,
                     **({"keep_blocks": cfg.keep_blocks} if cfg.keep_blocks else {}), "params": count_params(m),
                     **({"blocks": cfg.blocks, "heads": cfg.heads, "mlp_hidden": cfg.mlp_hidden} if vit else {}),
                     "macs": count_macs(m, input_shape), "p50_ms": p50, **timed, "meets_budget": p50 <= budget_ms})
    ok = [r for r in rows if r["meets_budget"]]
    if not ok and best_effort:
        ok = [min(rows, key=lambda r: r["p50_ms"])]  # the default target: the fastest candidate, marked as missing it
    if not ok:
        fastest = min(rows, key=lambda r: r["p50_ms"])
        raise InputError(f"no student meets the {budget_ms:.3g} ms budget at batch {batch} (teacher {teacher_p50:.3g} ms): the "
                         f"fastest candidate ({fastest['name']}) measured {fastest['p50_ms']:.3f} ms; raise --latency-budget "
                         "or lower --speedup")
    best = max(ok, key=lambda r: (r["macs"], r["params"]))
    chosen = cands[best["name"]][0]
    return {"chosen": best["name"], "config": chosen, "teacher_p50_ms": teacher_p50, "batch": batch,
            "budget_ms": budget_ms, "speedup_target": speedup, "speedup": teacher_p50 / best["p50_ms"],
            "precision": ("int8 in the budget (" + precision + ")") if int8 else "fp32",
            "candidates": sorted(rows, key=lambda r: r["p50_ms"])}
