"""Reading a finished run for the bundle: the final artifacts (by stage name) and their lineage back to the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError


def _stage_artifacts(run_dir: Path) -> list[Any]:
    """Every finished stage artifact of the run, in stage order (found by stage name: kdtoolkit.run.RunDir)."""
    from kdtoolkit.run import RunDir

    return list(RunDir(run_dir).artifacts().values())

def find_final(run_dir: Path) -> tuple[Any, Any | None]:
    """The deployable ONNX (the optimize stage's) and the engine artifact when the run built one."""
    from kdtoolkit.run import RunDir

    return RunDir(run_dir).final()

def _resolve_parent(parent: Any, run_dir: Path) -> Any | None:
    """A parent's recorded path may be relative to another working directory: also try it inside the run."""
    from kdtoolkit.artifact import Artifact

    for cand in (Path(parent.path), run_dir / Path(parent.path).name):
        if Artifact.is_artifact(cand):
            try:
                art = Artifact.load(cand)
            except InputError:
                continue
            if art.fingerprint() == parent.fingerprint:
                return art
    return None

def lineage(final: Any, run_dir: Path) -> list[dict[str, Any]]:
    """Walk the stage manifests' ``parents`` back to the teacher: one node per artifact, newest first."""
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    queue = [final]
    while queue:
        art = queue.pop(0)
        fp = art.fingerprint()
        if fp in seen:
            continue
        seen.add(fp)
        mf = art.info.get("model_file") or next((n for n in art.manifest.files if n.endswith((".onnx", ".plan", ".engine", ".pt", ".pt2"))), None)
        node = {
            "stage": art.manifest.stage, "kind": art.kind, "folder": art.path.name, "fingerprint": fp,
            "created": art.manifest.created,
            "model_file": mf, "model_sha256": art.manifest.files[mf].sha256 if mf in art.manifest.files else None,
            "parents": [p.fingerprint for p in art.manifest.parents],
            "metrics": {k: art.metrics[k] for k in ("accuracy", "teacher_agreement", "params", "macs") if k in art.metrics},
        }
        if not art.manifest.parents and "model" in art.manifest.config:
            node["source"] = art.manifest.config.get("model")
        nodes.append(node)
        for p in art.manifest.parents:
            resolved = _resolve_parent(p, run_dir)
            if resolved is None:
                if p.fingerprint not in seen:
                    seen.add(p.fingerprint)
                    nodes.append({"stage": p.stage, "kind": p.kind, "folder": Path(p.path).name, "fingerprint": p.fingerprint,
                                  "parents": [], "missing": True})
            else:
                queue.append(resolved)
    return nodes
