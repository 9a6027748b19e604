"""The stages of ``compress``; each is ``fn(ctx, inputs, out_dir, key) -> Artifact``.

Later capabilities (QAT, TensorRT builds, bundles) deepen these functions in place or add a
stage to the list in ``pipeline.compress``; the artifact hand-over stays the same.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kdtoolkit import fsutil
from kdtoolkit.artifact import Artifact, ArtifactWriter
from kdtoolkit.progress import log


def _load(art: Artifact):
    from kdtoolkit.models.loading import load_model

    return load_model(art.path)


def teacher_stage(ctx, inputs, out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.models.loading import save_model
    from kdtoolkit.student.build import count_macs, count_params

    t = ctx.teacher
    spec = ctx.splits.spec
    outputs = ctx.outputs  # the preflight's check_outputs (pipeline.compress): the teacher is not run again
    with ArtifactWriter(out_dir, kind="torch", stage="teacher", config=config, input_key=key) as w:
        meta = {**t.meta, **spec.to_dict()}
        if t.form in ("torchscript", "exported"):
            name = "model.pt2" if t.form == "exported" else "model.pt"
            shutil.copyfile(ctx.cfg.model, w.path(name))
        else:
            # a full pickle is stored as a torch.export program: no later stage unpickles the user's file again
            name = save_model(w.dir, t.module, t.recipe, meta, ctx.input_shape)
        if outputs is None:
            log("[teacher] evaluating on the test split", enabled=ctx.progress)
            r = evaluate(t.module, ctx.splits.test, spec)
        else:  # outputs that are not class logits: nothing to compare with the labels
            r = {"accuracy": None, "n": int(len(ctx.splits.test))}
        w.metrics.update({"accuracy": r["accuracy"], "n_test": r["n"], "params": count_params(t.module) if hasattr(t.module, "parameters") else None})
        try:
            w.metrics["macs"] = count_macs(t.module, ctx.input_shape) if t.rewritable else None
        except Exception:
            w.metrics["macs"] = None
        w.info.update({"model": meta, "model_file": name, "form": t.form, "arch": t.arch, "recipe": t.recipe,
                       "outputs": {"kind": "logits"} if outputs is None else {"kind": "raw", "names": outputs}})
        fsutil.write_json(w.path("test_logits_summary.json"), {"accuracy": r["accuracy"], "n": r["n"]})
    return w.artifact


def student_stage(ctx, inputs, out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    from kdtoolkit.data import batches

    (teacher_art,) = inputs
    spec = ctx.splits.spec
    calib = batches(ctx.splits.train, spec, 64, shuffle=True, seed=ctx.cfg.train.seed)
    # a full pickle: surgery on the module the user's own code built (its custom layers keep their meaning, e.g.
    # zero-padded shortcuts that Torch-Pruning handles as modules but not as a traced graph); the trust given with
    # --trust-pickle covers the run, and the student is stored without pickling (write_student)
    source = ctx.teacher if ctx.cfg.trust_pickle and ctx.teacher.form == "pickle" else _load(teacher_art)
    _, student, recipe, info, _cfg, _found = derive_student(source, ctx.cfg.student, ctx.profile, ctx.input_shape,
                                                           len(spec.classes), calib, progress=ctx.progress)
    return write_student(out_dir, student, recipe, spec.to_dict(), ctx.input_shape, info, config=config, parents=[teacher_art],
                         input_key=key)


def derive_student(teacher, cfg, profile, input_shape, num_classes: int, calib, *, progress: bool = True):
    """The student stage's work, shared with ``kdtoolkit student``: convert a TorchScript/exported teacher's
    graph to modules, fill profile defaults and search depth x width where needed, then build the student.

    Returns (teacher as rewritten, student, recipe, info, resolved StudentConfig, search result or None)."""
    from kdtoolkit.student.build import make_student

    if not teacher.rewritable:
        from kdtoolkit.models.loading import as_graph_modules

        log(f"[student] the teacher is a {teacher.form} model: converting its graph to modules for surgery", enabled=progress)
        teacher = as_graph_modules(teacher, input_shape)
    cfg, found = resolve_student_config(cfg, profile, teacher, input_shape, num_classes, progress)
    student, recipe, info = make_student(teacher, cfg, input_shape=input_shape, num_classes=num_classes, calib_batches=calib)
    if found is not None:
        info["search"] = {k: v for k, v in found.items() if k != "config"}
    info["resolved_config"] = cfg.model_dump(mode="json")  # profile defaults filled, search result applied
    return teacher, student, recipe, info, cfg, found


def write_student(out_dir: Path, student, recipe: dict[str, Any], meta: dict[str, Any], input_shape: tuple[int, ...],
                  info: dict[str, Any], *, config: dict[str, Any], parents: list[Artifact] | None = None, input_key: str = "",
                  metrics: dict[str, Any] | None = None) -> Artifact:
    """The student artifact (stage 01-student and ``kdtoolkit student``): recipe + weights, or a torch.export program."""
    from kdtoolkit.models.loading import save_model
    from kdtoolkit.student.build import count_macs, count_params

    with ArtifactWriter(out_dir, kind="torch", stage="student", config=config, parents=parents or [], input_key=input_key) as w:
        name = save_model(w.dir, student, recipe, meta, input_shape)
        info["stored_as"] = "recipe + weights" if name == "model.pt" else \
            "torch.export program (loads without the teacher's source code and without unpickling)"
        w.metrics.update({"params": count_params(student), "macs": count_macs(student, input_shape), **(metrics or {})})
        w.info.update({"model": meta, "model_file": name, "recipe": recipe, "surgery": info})
    return w.artifact


DEFAULT_SPEEDUP = 2.0  # what a student must at least give when the user names no budget


def resolve_student_config(cfg, profile, teacher, input_shape, num_classes: int, progress: bool = True):
    """Fill profile defaults (channel multiple, latency budget) and search depth x width where needed.

    With a budget (``--latency-budget``, the profile's) or a ``--speedup``, search for it. With neither
    and no shape chosen by the user, keep the plain separable student if it is at least 2x faster than
    the teacher at the profile's opt batch; otherwise (already-separable teachers, ConvNeXt-like ones
    with few standard convs) search depth and width toward 2x, and say so."""
    updates: dict[str, Any] = {}
    if cfg.channel_multiple is None:
        updates["channel_multiple"] = profile.channel_multiple
    cfg = cfg.model_copy(update=updates)
    if cfg.arch:
        return cfg, None
    budget = cfg.latency_budget_ms or profile.latency_budget_ms
    speedup = cfg.speedup
    batch = profile.batch.opt
    threads = profile.onnxruntime.intra_op_threads
    label = "ONNX Runtime CPU" + (" (proxy for the TensorRT target)" if profile.is_tensorrt else "")
    from kdtoolkit.errors import InputError
    from kdtoolkit.student.build import make_student
    from kdtoolkit.student.search import measure_models, search

    best_effort = False
    if budget is None and speedup is None:
        if cfg.depth < 1.0 or cfg.width < 1.0 or cfg.keep_blocks or cfg.blocks or cfg.heads or cfg.mlp_hidden:
            return cfg, None  # the user chose the shape
        try:
            model, _, info = make_student(teacher, cfg, input_shape=input_shape, num_classes=num_classes)
            lat = measure_models({"teacher": teacher.module, "student": model.eval()}, input_shape, [batch], threads=threads, iters=20)
            got = lat["teacher"][batch]["p50"] / lat["student"][batch]["p50"]
            if got >= DEFAULT_SPEEDUP:
                log(f"[student] separable student: {got:.2f}x faster than the teacher at batch {batch} ({label})", enabled=progress)
                return cfg, {"chosen": "separable", "speedup": got, "speedup_target": DEFAULT_SPEEDUP, "batch": batch,
                             "latency_runtime": label}
            why = f"the separable student is only {got:.2f}x faster ({len(info.get('converted', []))} convolutions converted)"
        except InputError as exc:
            why = str(exc).split(":")[0]
        speedup, best_effort = DEFAULT_SPEEDUP, True
        log(f"[student] {why}; searching depth x width toward {DEFAULT_SPEEDUP:g}x at batch {batch} ({label})", enabled=progress)
    else:
        what = " and ".join(filter(None, [f"{budget:g} ms" if budget else None, f"{speedup:g}x" if speedup else None]))
        log(f"[student] searching depth x width for the most capable student within {what} at batch {batch} ({label})",
            enabled=progress)
    int8_scheme = None
    if profile.backend == "onnxruntime" and profile.precision in ("int8", "auto"):  # INT8 timed here is the target's own
        from kdtoolkit.quant.schemes import scheme_for

        int8_scheme = scheme_for(profile)
        log(f"[student] INT8 is part of the speed budget ({profile.precision}): candidates are timed in FP32 and INT8", enabled=progress)
    found = search(teacher, cfg, budget_ms=budget, speedup=speedup, input_shape=input_shape, num_classes=num_classes,
                   batch=batch, threads=threads, best_effort=best_effort, precision=profile.precision, int8_scheme=int8_scheme,
                   int8_mode=profile.quant.mode)
    found["latency_runtime"] = label
    if best_effort and found["speedup"] < DEFAULT_SPEEDUP:
        log(f"[student] no candidate reached {DEFAULT_SPEEDUP:g}x; taking the fastest ({found['chosen']}, "
            f"{found['speedup']:.2f}x)", enabled=progress)
    return found["config"], found


def distill_stage(ctx, inputs, out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    from kdtoolkit.distill.trainer import Trainer
    from kdtoolkit.evaluate import evaluate

    teacher_art, student_art = inputs
    teacher = _load(teacher_art)
    student = _load(student_art)
    work = ctx.run_dir / ".work" / f"distill-{key[:12]}"
    trainer = Trainer(ctx.cfg.train, work, progress=ctx.progress)
    result = trainer.fit(student.module.train(), ctx.splits, teacher=teacher.module)
    log("[distill] evaluating the student on the test split", enabled=ctx.progress)
    t_logits = evaluate(teacher.module, ctx.splits.test, ctx.splits.spec)["logits"]
    return write_trained(out_dir, "distill", result, student.recipe, ctx.splits, work, config=config, input_shape=ctx.input_shape,
                         parents=[teacher_art, student_art], input_key=key, teacher_logits=t_logits)


def write_trained(out_dir: Path, stage: str, result: dict[str, Any], recipe: dict[str, Any] | None, splits, work: Path, *,
                  config: dict[str, Any], input_shape: tuple[int, ...] | None = None, parents: list[Artifact] | None = None,
                  input_key: str = "", teacher_logits=None, extra_metrics: dict[str, Any] | None = None,
                  extra_info: dict[str, Any] | None = None, write_extra=None) -> Artifact:
    """The artifact of a training run (stage 02-distill, ``kdtoolkit distill`` and ``finetune``): the model evaluated
    on the test split (agreement with the teacher when its logits are given), its history and metrics log.
    ``write_extra(folder)`` adds files of the caller's own (finetune --adapter: the adapter) before the manifest hashes them.

    With ``input_shape`` the model is stored for later stages (recipe + weights, or a torch.export program when the
    recipe needs the user's code); without it, as a kdtoolkit checkpoint ``model.pt``."""
    import shutil

    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.models.loading import save_checkpoint, save_model
    from kdtoolkit.student.build import count_params

    model, spec = result["model"], splits.spec
    r = evaluate(model, splits.test, spec, reference=teacher_logits)
    with ArtifactWriter(out_dir, kind="torch", stage=stage, config=config, parents=parents or [], input_key=input_key) as w:
        if input_shape is not None:
            name = save_model(w.dir, model, recipe, spec.to_dict(), input_shape)
        else:
            name = "model.pt"
            save_checkpoint(w.path(name), model, recipe, spec.to_dict())
        fsutil.write_json(w.path("history.json"), result["history"])
        if (work / "metrics.jsonl").exists():
            shutil.copyfile(work / "metrics.jsonl", w.path("metrics.jsonl"))
        if write_extra is not None:
            write_extra(w.dir)
        w.metrics.update({"accuracy": r["accuracy"], "n_test": r["n"], "params": count_params(model),
                          "best_val_accuracy": result["best"]["val_accuracy"], "best_epoch": result["best"]["epoch"],
                          "steps": result["steps"], "train_time_s": result["train_time_s"], **(extra_metrics or {})})
        if "agreement" in r:
            w.metrics["teacher_agreement"] = r["agreement"]
        w.info.update({"model": spec.to_dict(), "model_file": name, "recipe": recipe, "arch": (recipe or {}).get("arch"),
                       "work_dir": str(work), **(extra_info or {})})
    return w.artifact


def export_stage(ctx, inputs, out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    """Stages 03/04: the one export function ``kdtoolkit export`` calls too (export.onnx_export.export_artifact)."""
    from kdtoolkit.export.onnx_export import JETPACK_MAX_OPSET, export_artifact

    (src,) = inputs
    loaded = _load(src)
    opset = config["opset"]
    if opset > JETPACK_MAX_OPSET:
        log(f"[export] note: opset {opset} is newer than the TensorRT 8.5/8.6 parsers (JetPack 5, 6.0) accept", enabled=ctx.progress)
    prof = ctx.profile
    return export_artifact(
        loaded.module, ctx.input_shape, out_dir, opset=opset, config=config, model_meta=src.info.get("model", {}),
        dynamic_batch=prof.static_input_shape is None, parents=[src], input_key=key,
        trt_min_version=prof.tensorrt.min_version if ctx.cfg.opset is None and prof.tensorrt is not None else None,
        test=ctx.splits.test, spec=ctx.splits.spec, carry_metrics={k: src.metrics.get(k) for k in ("params", "macs") if k in src.metrics},
        log=lambda m: log(f"[export] {m}", enabled=ctx.progress), output_names=ctx.outputs)


def quantize_stage(ctx, inputs, out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    """INT8 per the profile's scheme (QAT under distillation by default, PTQ as the fast option), measured
    on ORT; for precision auto/int8 decide FP32 vs INT8 from measured latency and accuracy (see
    kdtoolkit.quant). ``model.onnx`` is the chosen model; ``int8.onnx`` is kept beside it. Written by
    kdtoolkit.quant.artifact.write_quantized, which ``kdtoolkit quantize`` calls too."""
    from kdtoolkit.config import Int8Config
    from kdtoolkit.quant.artifact import write_quantized

    teacher_art, student_art, fp32_art = inputs
    prof = ctx.profile
    q = prof.quant
    from kdtoolkit.quant.ptq import resolve_mode

    mode, why_mode = resolve_mode(q.mode, prof.backend, fp32_art.file("model.onnx"))
    if q.mode == "auto" and mode == "dynamic":
        log(f"[quantize] INT8 mode {why_mode}", enabled=ctx.progress)
    qat = q.method == "qat" and prof.precision not in ("fp32", "fp16") and mode == "static"  # dynamic INT8 has no scales to train
    int8_cfg = Int8Config(method="qat" if qat else "ptq", mode=mode, calib_method=q.calib_method, calib_size=min(q.calib_size, len(ctx.splits.train)),
                          percentile=q.percentile, tolerance_points=prof.accuracy_tolerance, opset=fp32_art.info.get("opset", 17),
                          seed=ctx.cfg.train.seed)
    return write_quantized(
        out_dir, fp32_art.file("model.onnx"), ctx.splits, prof, int8_cfg, config=config, measure=ctx.cfg.measure,
        parents=[fp32_art, student_art], input_key=key, info=fp32_art.info,
        metrics={k: fp32_art.metrics.get(k) for k in ("params", "macs", "parity") if k in fp32_art.metrics},
        student=_load(student_art).module if qat else None, teacher=_load(teacher_art).module if qat else None,
        qat_cfg=ctx.cfg.qat, loss=ctx.cfg.train.loss, work=ctx.run_dir / ".work" / f"qat-{key[:12]}", progress=ctx.progress)


def optimize_stage(ctx, inputs, out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    """Make the deployable model for the profile and measure its accuracy on the runtime that serves it."""
    from kdtoolkit.backends.ort import make_session, optimize_for_ort
    from kdtoolkit.evaluate import evaluate

    (src,) = inputs
    prof = ctx.profile
    with ArtifactWriter(out_dir, kind="onnx", stage="optimize", config=config, parents=[src], input_key=key) as w:
        w.info.update({k: v for k, v in src.info.items()})
        if prof.backend == "onnxruntime":
            optimize_for_ort(src.file("model.onnx"), w.path("model.onnx"), level="extended")
            w.info["ort_optimization"] = "extended (portable across x86 CPUs; layout transforms are applied at load)"
            label = "onnxruntime"
        else:
            shutil.copyfile(src.file("model.onnx"), w.path("model.onnx"))
            label = "onnxruntime-cpu proxy (TensorRT not on this machine; build on the device)"
            w.info["target_latency"] = "not measured: needs the target device"
            from kdtoolkit.backends.check import record_tensorrt_check  # check.json, counts, build_on_device.sh

            record_tensorrt_check(w, prof, calib_data=ctx.cfg.data.source)
        if (src.info.get("outputs") or {}).get("kind") == "raw":
            r = {"accuracy": None}  # outputs that are not class logits: no top-1 (the quantize stage's fidelity is carried)
        else:
            r = evaluate(make_session(w.path("model.onnx")), ctx.splits.test, ctx.splits.spec)
        w.metrics.update({"accuracy": r["accuracy"], "accuracy_runtime": label, "precision": src.info.get("precision", "fp32")})
        w.metrics.update({k: src.metrics.get(k) for k in ("params", "macs", "parity", "precision_reason", "kept_in_float", "output_fidelity")
                          if k in src.metrics})
    return w.artifact


def profile_stage(ctx, inputs, out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.latency.timing import measure

    teacher_onnx, student_onnx, fp32 = inputs  # fp32: the student's FP32 export (the teacher's with --no-student)
    m = ctx.cfg.measure
    threads = ctx.profile.onnxruntime.intra_op_threads
    batches = sorted({b for b in m.batches if ctx.profile.batch.min <= b <= ctx.profile.batch.max} or {ctx.profile.batch.opt})
    timed = student_onnx.file("model.onnx")
    proxy_note = None
    if ctx.profile.is_tensorrt and student_onnx.info.get("precision") == "int8":
        # ORT on a CPU has no fast path for TensorRT's symmetric s8 activations: timing that QDQ graph here says
        # nothing about the engine, so the CPU proxy times the same student in FP32
        timed = fp32.file("model.onnx")
        proxy_note = "student timed as its FP32 ONNX: the TensorRT-scheme INT8 QDQ has no fast path in ONNX Runtime on a CPU"
    log(f"[profile] timing teacher and student interleaved at batch {batches} (ONNX Runtime CPU"
        + (", student in FP32 as the proxy for the TensorRT INT8 engine)" if proxy_note else ")"), enabled=ctx.progress)
    with OrtRunner(teacher_onnx.file("model.onnx"), name="teacher", threads=threads) as rt, \
         OrtRunner(timed, name="student", threads=threads) as rs:
        res = measure([rt, rs], batches, warmup=m.warmup, iters=m.iters, progress=None)
        from kdtoolkit.latency.session import build_document

        settings = {"batches": batches, "iters": m.iters, "time_budget_s": None, "warmup": m.warmup, "threads": threads,
                    "providers": ["CPUExecutionProvider"], "interleaved": True, "seed": 0, "compile": False}
        doc = build_document([rt, rs], [str(teacher_onnx.path), str(student_onnx.path)], res, settings)

    with ArtifactWriter(out_dir, kind="profile", stage="profile", config=config, parents=[teacher_onnx, student_onnx], input_key=key) as w:
        fsutil.write_json(w.path("profile.json"), doc)
        w.metrics["latency_ms"] = {name: {str(b): {k: v for k, v in s.items() if k != "samples_ms"} for b, s in per.items()} for name, per in res.items()}
        if ctx.profile.is_tensorrt:
            w.info["note"] = "ONNX Runtime CPU latency is a proxy; TensorRT latency on the target is not measured here"
            if proxy_note:
                w.info["student_timed"] = proxy_note
    return w.artifact


def write_summary(ctx, *, teacher: Artifact, student: Artifact, deploy: Artifact, profile: Artifact) -> dict[str, Any]:
    """RUN/summary.json (a :class:`kdtoolkit.run.RunSummary`) and the reports; returns the summary as a dict."""
    lat = profile.metrics["latency_ms"]
    b1 = min(int(b) for b in lat["teacher"])

    def row(name: str, art: Artifact, onnx: Path, acc: float) -> dict[str, Any]:
        per = lat[name]
        return {
            "accuracy": acc,
            "params": art.metrics.get("params"),
            "macs": art.metrics.get("macs"),
            "size_bytes": onnx.stat().st_size,
            "latency_ms": {"p50": per[str(b1)]["p50"], "p90": per[str(b1)]["p90"], "batch": b1},
            "latency_by_batch": {b: {"p50": s["p50"], "p90": s["p90"]} for b, s in per.items()},
        }

    t_onnx = ctx.artifacts["export-teacher"].file("model.onnx")
    s_row = row("student", student, deploy.file("model.onnx"), deploy.metrics["accuracy"])
    s_row["accuracy_torch"] = student.metrics.get("accuracy")
    s_row["teacher_agreement"] = student.metrics.get("teacher_agreement")
    s_row["precision"] = deploy.metrics.get("precision")
    s_row["precision_reason"] = deploy.metrics.get("precision_reason")
    if deploy.metrics.get("kept_in_float"):
        s_row["kept_in_float"] = deploy.metrics["kept_in_float"]
    t_row = row("teacher", teacher, t_onnx, teacher.metrics["accuracy"])
    raw = (teacher.info.get("outputs") or {}).get("kind") == "raw"
    if raw:  # outputs that are not class logits: accuracy n/a; INT8 against FP32 output by output instead
        s_row["outputs"] = teacher.info["outputs"]["names"]
        if deploy.metrics.get("output_fidelity"):
            s_row["output_fidelity"] = deploy.metrics["output_fidelity"]
    speed = {f"b{b}": lat["teacher"][b]["p50"] / lat["student"][b]["p50"] for b in lat["teacher"]}
    summary = {
        "profile": ctx.profile.name,
        "backend": ctx.profile.backend,
        "no_student": ctx.cfg.no_student,
        "teacher": t_row,
        "student": s_row,
        "speedup": speed,
        "accuracy_drop_points": None if t_row["accuracy"] is None or s_row["accuracy"] is None else 100 * (t_row["accuracy"] - s_row["accuracy"]),
        "latency_runtime": "onnxruntime-cpu" + ((" (proxy for a TensorRT target: not measured on the device"
                                                 + ("; student timed in FP32" if profile.info.get("student_timed") else "") + ")")
                                                if ctx.profile.is_tensorrt else ""),
        "stages": {name: str(a.path) for name, a in ctx.artifacts.items()},
        "skipped": ctx.skipped,
        "data": ctx.splits.spec.to_dict(),
        "environment": profile.manifest.environment.get("cpu"),
    }
    goal = _speed_goal(ctx, speed, lat)
    if goal is not None:
        summary["speed_goal"] = goal
        if not goal["met"]:
            log(f"warning: the student search aimed at {goal['target']:g}x at batch {goal['batch']} but the deployed student "
                f"measured {goal['measured']:.2f}x ({goal['why']})", enabled=ctx.progress)
    from kdtoolkit.run import RunSummary

    typed = RunSummary.model_validate(summary)  # the one typed summary: summary.json, report, bundle and the CLI table read it
    typed.write(ctx.run_dir)
    summary = typed.to_dict()
    from kdtoolkit.report import write_reports

    write_reports(ctx.run_dir, summary)  # report.md, report.html and plots; `kdtoolkit report RUN_DIR` rebuilds them
    return summary


def _speed_goal(ctx, speed: dict[str, float], lat: dict[str, Any]) -> dict[str, Any] | None:
    """The search chose the student from one short timing; the profile stage times the model that ships. Say whether the
    search's goal (its speedup target, or the latency budget as a speedup) still holds there, so a miss is not silent."""
    art = ctx.artifacts.get("student")
    found = (art.info.get("surgery") or {}).get("search") if art is not None else None
    b = str((found or {}).get("batch"))
    if not found or ctx.cfg.no_student or f"b{b}" not in speed:
        return None
    if found.get("speedup_target"):
        target = float(found["speedup_target"])
    elif found.get("budget_ms"):
        target = lat["teacher"][b]["p50"] / float(found["budget_ms"])  # the budget, as a speedup on this run's teacher
    else:
        return None
    measured = speed[f"b{b}"]
    met = measured >= target
    return {"target": target, "batch": int(b), "measured": measured, "met": met,
            "why": "measured by the profile stage on the deployed model" if met else
            "the machine may be loaded, or the deployed precision is slower than the one the search timed"}
