"""The device report (device_report.json) a bundle's deploy/device_report.py writes on the target: checks and gate input.

Why: the figures a bundle made off the device lacks (engine outputs, accuracy and latency on the
target) are measured on the device by a standalone script; this module is kdtoolkit's read-only side
of it. ``verify`` checks the report belongs to this bundle and is intact; ``gate`` reads its latency
samples as a stored side.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError

SCHEMA = "kdtoolkit.device-report/1"
REPORT_NAME = "device_report.json"


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes the report's sha256 covers (same rule as deploy/device_report.py: no 'sha256' key, sorted, compact)."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def load_device_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a device report (the file, or a bundle folder holding one); InputError when it is not one."""
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_NAME
    try:
        doc = json.loads(p.read_text())
    except OSError as exc:
        raise InputError(f"{p}: cannot read the device report ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise InputError(f"{p}: not a kdtoolkit device report (schema {doc.get('schema') if isinstance(doc, dict) else None!r}, expected {SCHEMA!r})")
    return doc


def is_device_report(path: str | os.PathLike[str]) -> bool:
    """True for a device_report.json file (by its schema) or a bundle folder holding one."""
    p = Path(path)
    if p.is_dir():
        return (p / REPORT_NAME).is_file()
    if p.suffix.lower() != ".json" or not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_device_report(root: Path, manifest: dict[str, Any]) -> list[tuple[bool, str, str]]:
    """(ok, check, why) for the bundle's device report; [] when there is none. Reads files only."""
    p = root / REPORT_NAME
    if not p.is_file():
        return []
    try:
        doc = load_device_report(p)
    except InputError as exc:
        return [(False, "device report", str(exc))]
    out: list[tuple[bool, str, str]] = []
    want = doc.get("sha256")
    got = hashlib.sha256(canonical(doc)).hexdigest()
    out.append((want == got, "device report sha256", "" if want == got else "the report was changed after it was written"))
    b = doc.get("bundle") or {}
    msha = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    out.append((b.get("manifest_sha256") == msha, "device report is for this bundle",
                "" if b.get("manifest_sha256") == msha else "manifest.json differs from the one the report was measured with"))
    files = manifest.get("files") or {}
    onnx_rel = b.get("onnx")
    if onnx_rel:
        ok = (files.get(onnx_rel) or {}).get("sha256") == b.get("onnx_sha256")
        out.append((ok, f"device report model {onnx_rel}", "" if ok else "the report's ONNX hash is not the manifest's"))
    eng = doc.get("engine") or {}
    ef = eng.get("file")
    if ef and not os.path.isabs(ef) and (root / ef).is_file():
        import kdtoolkit.fsutil as fsutil

        ok = fsutil.sha256_file(root / ef) == eng.get("sha256")
        out.append((ok, f"device report engine {ef}", f"sha256 {str(eng.get('sha256'))[:12]}..." if ok
                    else "the engine file differs from the one measured (rebuilt since?)"))
    ref = doc.get("reference") or {}
    env = doc.get("environment") or {}
    where = f"TensorRT {env.get('tensorrt')} on {env.get('gpu')}"
    out.append((bool(ref.get("passed")), f"device reference outputs ({where})",
                f"max |diff| {ref.get('max_abs_diff')}, top-1 {ref.get('top1_agree')}/{ref.get('n')} agree" if "n" in ref
                else str(ref.get("why", "no reference result"))))
    return out


def device_report_as_profile(doc: dict[str, Any], *, path: str = "") -> dict[str, Any]:
    """The report as a kdtoolkit profile JSON document (one model, 'device'), so the gate can use it as a stored side."""
    env = doc.get("environment") or {}
    jet = env.get("jetson") or {}
    by_batch = (doc.get("latency_ms") or {}).get("by_batch") or {}
    results = {}
    for b, st in by_batch.items():
        samples = st.get("samples_ms") if isinstance(st, dict) else None
        if not isinstance(samples, list) or len(samples) < 5:
            raise InputError(f"{path or 'device report'}: batch {b} holds no raw samples_ms (>= 5) for a statistical test")
        results[str(b)] = {k: v for k, v in st.items()}
    if not results:
        raise InputError(f"{path or 'device report'}: no latency measured in it")
    acc = doc.get("accuracy") or {}
    lat = doc.get("latency_ms") or {}
    return {
        "schema": "kdtoolkit.profile/1",
        "created": doc.get("created"),
        "settings": {"iters": lat.get("iters"), "warmup": lat.get("warmup"), "providers": ["TensorRT"], "source": "device report"},
        "environment": {"gpu": env.get("gpu"), "tensorrt": env.get("tensorrt"),
                        "jetson": {"l4t": jet.get("l4t"), "power_mode": jet.get("power_mode")} if jet else None,
                        "cpu": {"arch": env.get("machine")}},
        "models": {"device": {"runner": "tensorrt", "source": path, "engine_sha256": (doc.get("engine") or {}).get("sha256"),
                              **({"accuracy": acc["top1"]} if isinstance(acc.get("top1"), (int, float)) else {})}},
        "results": {"device": results},
        "_path": path,
    }
