"""``compress``: the ordered list of stages over a run folder.

``STAGES`` is the declarative list (kdtoolkit.run.Stage: name, inputs, ``config(ctx)``, ``run``);
each artifact stage writes ``RUN/NN-name`` and its manifest stores ``config(ctx)`` and a key hashed
from the stage name, that same configuration and the fingerprints of its input artifacts. A stage whose key matches the finished folder is skipped,
so a repeated or interrupted run resumes where it stopped (make-like, content-addressed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdtoolkit import fsutil
from kdtoolkit.artifact import Artifact
from kdtoolkit.config import (
    CompressConfig,
    DataConfig,
    LossConfig,
    MeasureConfig,
    QatConfig,
    StudentConfig,
    TrainConfig,
    load_config,
    save_config,
)
from kdtoolkit.errors import InputError
from kdtoolkit.progress import log
from kdtoolkit.run import RunDir, RunSummary, Stage  # noqa: F401  (RunSummary re-exported)

__all__ = ["CompressConfig", "DataConfig", "LossConfig", "MeasureConfig", "QatConfig", "StudentConfig", "TrainConfig",
           "load_config", "save_config", "Context", "compress", "pin_model", "run_stage", "STAGES", "Stage", "RunDir", "RunSummary"]

# bump when a stage's output or key for the same inputs changes; 2: one config per stage (key == manifest config),
# so stage folders made by kdtoolkit before it are redone once, never taken as current
STAGE_VERSION = 2


class Context:
    """What stages share within one run: config, profile, data, loaded models (lazily)."""

    def __init__(self, cfg: CompressConfig, run_dir: Path, *, progress: bool = True) -> None:
        from kdtoolkit.targets import load_profile

        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
        self.profile = load_profile(cfg.profile, cfg.profile_overrides)
        self._splits = None
        self._teacher = None
        self.artifacts: dict[str, Artifact] = {}
        self.skipped: list[str] = []
        self.summary: dict[str, Any] = {}
        self.outputs: list[str] | None = None  # names of the outputs when they are not class logits (--no-student only)

    @property
    def teacher(self):
        if self._teacher is None:
            from kdtoolkit.models.loading import load_model

            self._teacher = load_model(self.cfg.model, arch=self.cfg.arch, trust_pickle=self.cfg.trust_pickle)
        return self._teacher

    @property
    def splits(self):
        if self._splits is None:
            # one resolution order for every command: flags, teacher metadata, zoo entry, data
            from kdtoolkit.data.inputspec import InputFlags, load_splits, resolve_input

            d = self.cfg.data
            t = self.teacher if self._teacher is not None or Path(self.cfg.model).exists() else None
            spec = resolve_input(InputFlags.from_data_config(d), dict(t.meta) if t is not None else {},
                                 self.cfg.arch or (t.arch if t is not None else None),
                                 module=t.module if t is not None and t.rewritable else None)
            self._splits = load_splits(
                d.source, spec,
                val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed,
                on_bad_image=d.on_bad_image, train_limit=d.train_limit, test_limit=d.test_limit,
            )
        return self._splits

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        s = self.splits.spec
        return (1, s.channels, s.input_size[0], s.input_size[1])

    def data_fingerprint(self) -> dict[str, Any]:
        return self.cfg.data.model_dump(mode="json")


# ----------------------------------------------------------------------------- the stages


def _data(ctx: Context) -> dict[str, Any]:
    return ctx.data_fingerprint()


def _target(ctx: Context) -> dict[str, Any]:
    return ctx.profile.model_dump(mode="json")


def _teacher_config(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    return {"model": cfg.model, "model_sha": cfg.model_sha256 or _folder_fingerprint(Path(cfg.model)), "arch": cfg.arch,
            "data": _data(ctx)}


def _folder_fingerprint(path: Path) -> str:
    """A model given as a folder: a kdtoolkit artifact, or a timm / transformers save_pretrained folder."""
    from kdtoolkit.models.vit import folder_fingerprint, is_pretrained_folder

    return folder_fingerprint(path) if is_pretrained_folder(path) else Artifact.load(path).fingerprint()


def _export_config(ctx: Context) -> dict[str, Any]:
    from kdtoolkit.export.onnx_export import choose_opset

    return {"opset": choose_opset(ctx.cfg.opset, ctx.profile.max_opset), "data": _data(ctx), "batch": ctx.profile.batch.model_dump(),
            "static_input_shape": ctx.profile.static_input_shape}


def _quantize_config(ctx: Context) -> dict[str, Any]:
    prof, cfg = ctx.profile, ctx.cfg
    return {"profile": prof.name, "precision_policy": prof.precision, "method": prof.quant.method, "qat": cfg.qat.model_dump(mode="json"),
            "target": _target(ctx), "loss": cfg.train.loss.model_dump(mode="json"), "data": _data(ctx), "measure": cfg.measure.model_dump()}


def _has_student(ctx: Context) -> bool:
    return not ctx.cfg.no_student


def _wants_build(ctx: Context) -> bool:
    return ctx.cfg.build and ctx.profile.is_tensorrt


def _stage(fn_name: str) -> Callable[..., Artifact]:
    """The stage function ``kdtoolkit.stages.<fn_name>`` (imported when it runs: stages import torch)."""

    def run(ctx: Context, inputs: list[Artifact], out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
        from kdtoolkit import stages

        return getattr(stages, fn_name)(ctx, inputs, out_dir, key, config)

    run.__name__ = fn_name
    return run


def _build(ctx: Context, inputs: list[Artifact], out_dir: Path, key: str, config: dict[str, Any]) -> Artifact:
    from kdtoolkit.backends.trt.builder import build_engine

    (onnx_art,) = inputs
    return build_engine(onnx_art.path, ctx.profile, out_dir, calib_data=ctx.cfg.data.source, input_key=key,
                        on_bad_image=ctx.cfg.data.on_bad_image,
                        log=lambda m: log(f"[build] {m}", enabled=ctx.progress))


def _report(ctx: Context, inputs: list[Artifact], out_dir: Path, key: str, config: dict[str, Any]) -> None:
    from kdtoolkit import stages

    teacher, student, deploy, profile = inputs
    ctx.summary = stages.write_summary(ctx, teacher=teacher, student=student, deploy=deploy, profile=profile)


def _bundle(ctx: Context, inputs: list[Artifact], out_dir: Path, key: str, config: dict[str, Any]) -> None:
    # the hand-off bundle (written to a temp folder and renamed, so a rerun replaces it whole)
    from kdtoolkit.bundle import make_bundle

    log(f"[bundle] writing {out_dir}", enabled=ctx.progress)
    make_bundle(ctx.run_dir, out_dir, splits=ctx.splits)


# The declarative list ``compress`` runs, in order. Artifact stages (a folder NN-name with a manifest)
# are skipped when their key is unchanged; ``report`` and ``bundle`` are rewritten on every run.
STAGES: tuple[Stage, ...] = (
    Stage(0, "teacher", (), _teacher_config, _stage("teacher_stage")),
    Stage(1, "student", ("teacher",), lambda ctx: {"student": ctx.cfg.student.model_dump(mode="json"), "data": _data(ctx)},
          _stage("student_stage"), enabled=_has_student),
    Stage(2, "distill", ("teacher", "student"), lambda ctx: {**ctx.cfg.train.model_dump(mode="json"), "data": _data(ctx)},
          _stage("distill_stage"), enabled=_has_student, alias="teacher"),
    Stage(3, "export-teacher", ("teacher",), _export_config, _stage("export_stage")),
    Stage(4, "export", ("distill",), _export_config, _stage("export_stage"), enabled=_has_student, alias="export-teacher"),
    Stage(5, "quantize", ("teacher", "distill", "export"), _quantize_config, _stage("quantize_stage")),
    Stage(6, "optimize", ("quantize",), lambda ctx: {"profile": ctx.profile.name, "target": _target(ctx)}, _stage("optimize_stage")),
    Stage(7, "profile", ("export-teacher", "optimize", "export"),
          lambda ctx: {**ctx.cfg.measure.model_dump(), "target": _target(ctx), "data": _data(ctx)}, _stage("profile_stage")),
    Stage(8, "build", ("optimize",), lambda ctx: {"profile": ctx.profile.name, "target": _target(ctx), "calib_data": ctx.cfg.data.source},
          _build, enabled=_wants_build),
    Stage(9, "report", ("teacher", "distill", "optimize", "profile"), lambda ctx: {}, _report, artifact=False),
    Stage(10, "bundle", ("optimize", "profile"), lambda ctx: {}, _bundle, artifact=False),
)


def run_stage(ctx: Context, stage: Stage, inputs: list[Artifact]) -> Artifact:
    """Run ``stage`` unless a finished artifact with the same key is already in place."""
    out_dir = ctx.run_dir / stage.folder
    config = stage.config(ctx)
    key = fsutil.stable_hash({"stage": stage.name, "v": STAGE_VERSION, "config": config, "inputs": [a.fingerprint() for a in inputs]})
    if Artifact.is_artifact(out_dir):
        try:
            art = Artifact.load(out_dir)
            if art.manifest.input_key == key and not art.verify():
                ctx.skipped.append(stage.name)
                log(f"[{stage.name}] up to date, skipped ({out_dir})", enabled=ctx.progress)
                ctx.artifacts[stage.name] = art
                return art
        except InputError:
            pass
    log(f"[{stage.name}] running -> {out_dir}", enabled=ctx.progress)
    art = stage.run(ctx, inputs, out_dir, key, config)
    ctx.artifacts[stage.name] = art
    return art


def compress(cfg: CompressConfig, run_dir: str | os.PathLike[str], *, progress: bool = True, wait: bool = False) -> dict[str, Any]:
    """Run every stage for the profile; return the summary (also written to RUN/summary.json).

    One run at a time per run folder: a second one refuses in one line (or waits with ``wait``)."""
    from kdtoolkit.evaluate import check_outputs

    run_dir = Path(run_dir)
    cfg = pin_model(cfg)
    if cfg.no_student and cfg.profile_overrides.get("quant.method", "ptq") != "ptq":
        raise InputError("--no-student quantizes with PTQ (QAT trains a student); drop quant.method=qat from the overrides")
    if cfg.no_student:
        cfg = cfg.model_copy(update={"profile_overrides": {**cfg.profile_overrides, "quant.method": "ptq"}})
    ctx = Context(cfg, run_dir, progress=progress)
    if ctx.profile.quant.mode == "dynamic" and ctx.profile.is_tensorrt:
        raise InputError(f"dynamic INT8 is for ONNX Runtime CPU targets; {ctx.profile.name} is a TensorRT profile, which needs static Q/DQ "
                         "(drop --int8-mode dynamic)")
    if ctx.profile.name != cfg.profile and not str(cfg.profile).endswith((".yaml", ".yml")):
        log(f"profile: {cfg.profile} -> {ctx.profile.name}", enabled=progress)
    # preflight: bad input fails here, in one line, before anything is written
    from kdtoolkit.models.vit import check_input

    check_input(ctx.teacher.module, cfg.data.input_size)  # a ViT's patch grid: a flag's size before the data is read
    check_input(ctx.teacher.module, ctx.splits.spec.input_size)  # and the resolved size before the model runs
    ctx.outputs = check_outputs(ctx.teacher.module, ctx.splits.spec, allow_raw=cfg.no_student)
    if ctx.outputs is not None:
        log(f"outputs {', '.join(ctx.outputs)} are not class logits: no top-1; exported, quantized and checked output by output",
            enabled=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    with fsutil.run_lock(run_dir, wait=wait, on_wait=lambda who: log(f"waiting for {who}", enabled=progress)):
        return _compress_locked(ctx, cfg, run_dir, progress)


def pin_model(cfg: CompressConfig) -> CompressConfig:
    """Record the model file's sha256 in the config, or refuse a file that changed since it was recorded.

    Trust given with --trust-pickle is trust in one file: a rerun from RUN/config.yaml must never
    unpickle a different file under the same name."""
    path = Path(cfg.model)
    if not path.is_file():
        return cfg
    sha = fsutil.sha256_file(path)
    if cfg.model_sha256 and cfg.model_sha256 != sha:
        raise InputError(f"{path} changed since this run was configured (sha256 {sha[:12]}... is not the recorded "
                         f"{cfg.model_sha256[:12]}...); start a new run folder with --out, or delete model_sha256 from the config "
                         "if you trust the new file")
    return cfg.model_copy(update={"model_sha256": sha})


def _compress_locked(ctx: Context, cfg: CompressConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
    save_config(cfg, run_dir / "config.yaml")
    available: dict[str, Artifact] = {}
    for stage in STAGES:
        if not stage.enabled(ctx):
            if stage.name == "student":
                log("[student] --no-student: the teacher itself is exported, quantized with PTQ, checked and bundled", enabled=progress)
            if stage.alias is not None:
                available[stage.name] = available[stage.alias]
            continue
        inputs = [available[n] for n in stage.inputs]
        if not stage.artifact:
            stage.run(ctx, inputs, run_dir / stage.name, "", stage.config(ctx))
            continue
        available[stage.name] = run_stage(ctx, stage, inputs)
    return ctx.summary
