"""The one artifact type between stages: a folder of files plus a validated ``manifest.json``.

A stage writes into a temp folder through :class:`ArtifactWriter`; the folder gets its final
name only after every file is written and hashed, so a half-written artifact is never taken
as complete (an interrupted run simply redoes that stage).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdtoolkit import fsutil
from kdtoolkit.errors import CheckFailed, InputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

Kind = Literal["torch", "onnx", "engine", "profile", "report", "bundle", "calibration", "dataset"]


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(description="sha256 of the file's bytes")
    size: int = Field(description="size in bytes")


class Parent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="where the parent artifact was when this one was made")
    kind: str = Field(description="the parent's kind")
    stage: str = Field(description="the stage that made the parent")
    fingerprint: str = Field(description="hash of the parent's file hashes")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = Field(SCHEMA_VERSION, description="manifest format version")
    kind: Kind = Field(description="what the artifact holds")
    stage: str = Field(description="the stage that wrote it")
    created: str = Field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    files: dict[str, FileEntry] = Field(default_factory=dict, description="relative path -> hash and size")
    parents: list[Parent] = Field(default_factory=list, description="lineage: artifacts this one came from")
    config: dict[str, Any] = Field(default_factory=dict, description="resolved configuration of the stage")
    environment: dict[str, Any] = Field(default_factory=dict, description="versions and hardware")
    metrics: dict[str, Any] = Field(default_factory=dict, description="figures measured on this artifact")
    info: dict[str, Any] = Field(default_factory=dict, description="stage-specific facts (model I/O, recipe, ...)")
    input_key: str = Field("", description="hash of inputs + config; equal means the stage can be skipped")


class Artifact:
    """A finished artifact folder."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.info

    def file(self, name: str) -> Path:
        if name not in self.manifest.files:
            raise InputError(f"artifact {self.path} has no file {name!r} (has: {', '.join(self.manifest.files) or 'none'})")
        return self.path / name

    def first_file(self, suffix: str) -> Path:
        for name in self.manifest.files:
            if name.endswith(suffix):
                return self.path / name
        raise InputError(f"artifact {self.path} ({self.kind}) holds no *{suffix} file")

    def fingerprint(self) -> str:
        return fsutil.stable_hash({k: v.sha256 for k, v in sorted(self.manifest.files.items())})

    def as_parent(self) -> Parent:
        return Parent(path=str(self.path), kind=self.kind, stage=self.manifest.stage, fingerprint=self.fingerprint())

    def verify(self) -> list[str]:
        """Re-hash every file; return one problem line per missing or changed file."""
        problems = []
        for name, entry in self.manifest.files.items():
            p = self.path / name
            if not p.exists():
                problems.append(f"missing file: {name}")
            elif fsutil.sha256_file(p) != entry.sha256:
                problems.append(f"hash mismatch: {name}")
        return problems

    def check(self) -> None:
        problems = self.verify()
        if problems:
            raise CheckFailed(f"artifact {self.path} is damaged: " + "; ".join(problems))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Artifact:
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise InputError(f"{path} is not an artifact folder (no {MANIFEST})")
        try:
            raw = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{mpath}: unreadable manifest ({exc})") from None
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise InputError(
                f"{mpath}: manifest schema version {version} is newer than this kdtoolkit supports ({SCHEMA_VERSION}); upgrade kdtoolkit"
            )
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise InputError(f"{mpath}: invalid manifest at {loc}: {first['msg']}") from None
        return cls(path, manifest)

    @staticmethod
    def is_artifact(path: str | os.PathLike[str]) -> bool:
        return (Path(path) / MANIFEST).is_file()


class ArtifactWriter:
    """Collect a stage's files in a temp folder, then hash, write the manifest and move into place.

    Use as a context manager; on error the temp folder is removed and any previous artifact
    at ``out_dir`` stays as it was.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        kind: Kind,
        stage: str,
        config: dict[str, Any] | None = None,
        parents: list[Artifact] | None = None,
        input_key: str = "",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self.manifest = Manifest(
            kind=kind,
            stage=stage,
            config=config or {},
            parents=[p.as_parent() for p in (parents or [])],
            input_key=input_key,
        )
        self.artifact: Artifact | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.info

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self) -> Artifact:
        from kdtoolkit.envinfo import environment

        files = {}
        for p in sorted(self.dir.rglob("*")):
            if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
                rel = p.relative_to(self.dir).as_posix()
                files[rel] = FileEntry(sha256=fsutil.sha256_file(p), size=p.stat().st_size)
        self.manifest.files = files
        if not self.manifest.environment:
            self.manifest.environment = environment()
        fsutil.write_json(self.dir / MANIFEST, self.manifest.model_dump(mode="json"))
        fsutil.replace_dir(self.dir, self.out_dir)
        self.artifact = Artifact(self.out_dir, self.manifest)
        return self.artifact

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.artifact is None:
            self.commit()
        if self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
