"""``compress``: the ordered list of stages over a run folder.

Each stage is ``run(inputs, config, out_dir) -> Artifact``. Its folder is named by its position
and name; its manifest stores a key hashed from the stage name, its configuration and the
fingerprints of its input artifacts. A stage whose key matches the finished folder is skipped,
so a repeated or interrupted run resumes where it stopped (make-like, content-addressed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdtoolkit import fsutil
from kdtoolkit.artifact import Artifact
from kdtoolkit.config import (CompressConfig, DataConfig, LossConfig, MeasureConfig, QatConfig, StudentConfig, TrainConfig,
                              load_config, save_config)
from kdtoolkit.errors import InputError
from kdtoolkit.progress import log

__all__ = ["CompressConfig", "DataConfig", "LossConfig", "MeasureConfig", "QatConfig", "StudentConfig", "TrainConfig",
           "load_config", "save_config", "Context", "compress", "pin_model", "run_stage"]

STAGE_VERSION = 1  # bump when a stage's output for the same inputs changes


class Context:
    """What stages share within one run: config, profile, data, loaded models (lazily)."""

    def __init__(self, cfg: CompressConfig, run_dir: Path, *, progress: bool = True) -> None:
        from kdtoolkit.profiles import load_profile

        self.cfg = cfg
        self.run_dir = run_dir
        self.progress = progress
        self.profile = load_profile(cfg.profile, cfg.profile_overrides)
        self._splits = None
        self._teacher = None
        self.artifacts: dict[str, Artifact] = {}
        self.skipped: list[str] = []

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


Stage = Callable[[Context, list[Artifact], Path, str], Artifact]


def run_stage(ctx: Context, index: int, name: str, fn: Stage, inputs: list[Artifact], config: dict[str, Any]) -> Artifact:
    """Run ``fn`` unless a finished artifact with the same key is already in place."""
    out_dir = ctx.run_dir / f"{index:02d}-{name}"
    key = fsutil.stable_hash({"stage": name, "v": STAGE_VERSION, "config": config, "inputs": [a.fingerprint() for a in inputs]})
    if Artifact.is_artifact(out_dir):
        try:
            art = Artifact.load(out_dir)
            if art.manifest.input_key == key and not art.verify():
                ctx.skipped.append(name)
                log(f"[{name}] up to date, skipped ({out_dir})", enabled=ctx.progress)
                ctx.artifacts[name] = art
                return art
        except InputError:
            pass
    log(f"[{name}] running -> {out_dir}", enabled=ctx.progress)
    art = fn(ctx, inputs, out_dir, key)
    ctx.artifacts[name] = art
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
    if ctx.profile.name != cfg.profile and not str(cfg.profile).endswith((".yaml", ".yml")):
        log(f"profile: {cfg.profile} -> {ctx.profile.name}", enabled=progress)
    # preflight: bad input fails here, in one line, before anything is written
    check_outputs(ctx.teacher.module, ctx.splits.spec)
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
    from kdtoolkit import stages as S

    save_config(cfg, run_dir / "config.yaml")
    data_cfg = ctx.data_fingerprint()
    model_id = cfg.model_sha256 or Artifact.load(cfg.model).fingerprint()
    teacher_cfg = {"model": cfg.model, "model_sha": model_id,
                   "arch": cfg.arch, "data": data_cfg}
    teacher = run_stage(ctx, 0, "teacher", S.teacher_stage, [], teacher_cfg)
    from kdtoolkit.export.onnx_export import choose_opset

    exp_cfg = {"opset": choose_opset(cfg.opset, ctx.profile.max_opset), "data": data_cfg, "batch": ctx.profile.batch.model_dump()}
    if cfg.no_student:
        log("[student] --no-student: the teacher itself is exported, quantized with PTQ, checked and bundled", enabled=progress)
        distilled = teacher
        t_onnx = run_stage(ctx, 3, "export-teacher", S.export_stage, [teacher], exp_cfg)
        s_onnx = t_onnx
    else:
        student = run_stage(ctx, 1, "student", S.student_stage, [teacher],
                            {"student": cfg.student.model_dump(mode="json"), "data": data_cfg})
        distilled = run_stage(ctx, 2, "distill", S.distill_stage, [teacher, student],
                              {"train": cfg.train.model_dump(mode="json"), "data": data_cfg})
        t_onnx = run_stage(ctx, 3, "export-teacher", S.export_stage, [teacher], exp_cfg)
        s_onnx = run_stage(ctx, 4, "export", S.export_stage, [distilled], exp_cfg)
    quant = run_stage(ctx, 5, "quantize", S.quantize_stage, [teacher, distilled, s_onnx],
                      {"profile": ctx.profile.model_dump(mode="json"), "qat": cfg.qat.model_dump(mode="json"), "loss": cfg.train.loss.model_dump(mode="json"),
                       "data": data_cfg, "measure": cfg.measure.model_dump()})
    deploy = run_stage(ctx, 6, "optimize", S.optimize_stage, [quant], {"profile": ctx.profile.model_dump(mode="json")})
    prof = run_stage(ctx, 7, "profile", S.profile_stage, [t_onnx, deploy],
                     {"measure": cfg.measure.model_dump(), "profile": ctx.profile.model_dump(mode="json"), "data": data_cfg})
    summary = S.write_summary(ctx, teacher=teacher, student=distilled, deploy=deploy, profile=prof)
    # last stage: the hand-off bundle (written to a temp folder and renamed, so a rerun replaces it whole)
    from kdtoolkit.bundle import make_bundle

    log(f"[bundle] writing {run_dir / 'bundle'}", enabled=progress)
    make_bundle(run_dir, run_dir / "bundle", splits=ctx.splits)
    return summary
