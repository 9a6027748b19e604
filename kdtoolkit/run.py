"""A compress run folder: the ``Stage`` type, ``RunDir`` (artifacts found by stage name) and the
typed run summary (``RUN/summary.json``) that bundle, report and the CLI table read.

Imports no torch: a finished run can be read, reported and bundled without loading a model.

Layout of a run folder (``STAGE_VERSION`` 2)::

    RUN/config.yaml          the resolved CompressConfig (kdtoolkit.config)
    RUN/NN-<stage>/          one artifact per stage (NN = the stage's position in pipeline.STAGES)
    RUN/summary.json         RunSummary
    RUN/report.md|html, RUN/bundle/
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdtoolkit import fsutil
from kdtoolkit.artifact import Artifact
from kdtoolkit.errors import InputError

if TYPE_CHECKING:
    from kdtoolkit.pipeline import Context

SUMMARY = "summary.json"


def _always(ctx: Context) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One step of ``compress``.

    ``config(ctx)`` is both what the skip key hashes and what the stage's manifest records as its
    configuration; ``run(ctx, inputs, out_dir, key, config)`` writes the artifact. ``inputs`` names
    the stages whose artifacts it takes (in order); ``enabled(ctx)`` leaves a stage out of a run
    (``--no-student``; ``build`` without TensorRT); ``alias`` names the stage whose artifact stands
    in for this one when it is left out (the teacher stands in for the distilled student)."""

    index: int
    name: str
    inputs: tuple[str, ...]
    config: Callable[[Context], dict[str, Any]]
    run: Callable[..., Artifact]
    enabled: Callable[[Context], bool] = _always
    alias: str | None = None
    artifact: bool = True  # False: no manifest, no skip key; rewritten every run (report, bundle)

    @property
    def folder(self) -> str:
        return f"{self.index:02d}-{self.name}" if self.artifact else self.name


def stage_folders() -> dict[str, str]:
    """Stage name -> folder name, from the declarative list in ``kdtoolkit.pipeline``."""
    from kdtoolkit.pipeline import STAGES

    return {s.name: s.folder for s in STAGES if s.artifact}


class RunDir:
    """A run folder; finds stage artifacts by stage name, never by parsing folder names."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def folder(self, stage: str) -> Path:
        folders = stage_folders()
        if stage not in folders:
            raise InputError(f"unknown stage {stage!r}; known: {', '.join(folders)}")
        return self.path / folders[stage]

    def find(self, stage: str) -> Artifact | None:
        """The finished artifact of ``stage``, or None when that stage has not run (or was left out)."""
        d = self.folder(stage)
        if not Artifact.is_artifact(d):
            return None
        return Artifact.load(d)

    def artifacts(self) -> dict[str, Artifact]:
        """Every finished stage artifact, in stage order."""
        out = {}
        for name in stage_folders():
            art = self.find(name)
            if art is not None:
                out[name] = art
        return out

    def final(self) -> tuple[Artifact, Artifact | None]:
        """The deployable ONNX (the optimize stage's) and the engine artifact when the build stage made one."""
        arts = self.artifacts()
        onnx = arts.get("optimize") or arts.get("quantize") or arts.get("export")
        if onnx is None:
            found = ", ".join(a.path.name for a in arts.values()) or "no stage folders"
            raise InputError(f"{self.path}: no final artifact to bundle (no optimize/ONNX stage finished; found: {found}); "
                             "rerun `kdtoolkit compress` to finish the run")
        return onnx, arts.get("build") or self._engine_elsewhere()

    def _engine_elsewhere(self) -> Artifact | None:
        """An engine artifact put into the run by hand (``kdtoolkit build ... --out RUN/NAME``), by its manifest's kind."""
        known = set(stage_folders().values())
        found = None
        for d in sorted(p for p in self.path.iterdir() if p.is_dir() and p.name not in known and not p.name.startswith((".", "bundle"))):
            if Artifact.is_artifact(d):
                try:
                    art = Artifact.load(d)
                except InputError:
                    continue
                if art.kind == "engine":
                    found = art
        return found

    def summary(self) -> RunSummary:
        return RunSummary.load(self.path)


# ----------------------------------------------------------------------------- the run summary


class _Open(BaseModel):
    # summaries are read back from disk: tolerate fields a newer kdtoolkit adds, keep them on rewrite
    model_config = ConfigDict(extra="allow")


class LatencyPoint(_Open):
    p50: float = Field(description="median latency (ms)")
    p90: float = Field(description="90th percentile latency (ms)")
    batch: int | None = Field(None, description="batch size (in latency_ms)")


class ModelRow(_Open):
    """One model's figures: the teacher, or the deployed student (or the teacher itself with --no-student)."""

    accuracy: float | None = Field(description="top-1 on the test split, a fraction in [0, 1]; null when not measurable "
                                               "(outputs that are not class logits)")
    params: int | None = Field(None, description="parameter count")
    macs: int | None = Field(None, description="multiply-accumulates at batch 1")
    size_bytes: int = Field(description="size of the ONNX file")
    latency_ms: LatencyPoint = Field(description="latency at the smallest measured batch")
    latency_by_batch: dict[str, LatencyPoint] = Field(description="batch size -> p50/p90")
    accuracy_torch: float | None = Field(None, description="student: accuracy of the PyTorch model")
    teacher_agreement: float | None = Field(None, description="student: top-1 agreement with the teacher")
    precision: str | None = Field(None, description="student: shipped precision")
    precision_reason: str | None = Field(None, description="student: why that precision")
    outputs: list[str] | None = Field(None, description="names of the outputs when they are not class logits")
    output_fidelity: dict[str, Any] | None = Field(None, description="INT8 against FP32 per output (outputs that are not logits)")


class RunSummary(_Open):
    """``RUN/summary.json``: what compress measured, in one typed document."""

    profile: str = Field(description="target profile name")
    backend: str = Field(description="tensorrt or onnxruntime")
    no_student: bool = Field(False, description="the teacher itself was deployed")
    teacher: ModelRow
    student: ModelRow
    speedup: dict[str, float] = Field(description="'b<batch>' -> teacher p50 / student p50")
    accuracy_drop_points: float | None = Field(description="teacher minus student top-1, in percentage points; null when not measured")
    latency_runtime: str = Field(description="where latency was measured")
    stages: dict[str, str] = Field(default_factory=dict, description="stage name -> artifact folder")
    skipped: list[str] = Field(default_factory=list, description="stages that were up to date")
    data: dict[str, Any] = Field(default_factory=dict, description="the resolved input spec")
    environment: Any = Field(None, description="CPU of the profiling run")
    speed_goal: dict[str, Any] | None = Field(None, description="the student search's speed goal re-checked on the deployed "
                                                                "model: target, batch, measured speedup, met")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)

    def write(self, run_dir: Path) -> None:
        fsutil.write_json(Path(run_dir) / SUMMARY, self.to_dict())

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> RunSummary:
        run_dir = Path(run_dir)
        p = run_dir / SUMMARY
        if not p.is_file():
            raise InputError(f"{run_dir} is not a compress run folder (no summary.json)")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}); rerun compress to rewrite it") from None
        if not isinstance(raw, dict) or "teacher" not in raw or "student" not in raw:
            raise InputError(f"{p}: expected a compress summary with 'teacher' and 'student' rows")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            e = exc.errors()[0]
            raise InputError(f"{p}: {'.'.join(map(str, e['loc']))}: {e['msg']}; rerun compress to rewrite it") from None
