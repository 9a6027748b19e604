"""`kdtoolkit verify`: hashes, manifest version and schema, and the reference outputs on the manifest's runtime."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kdtoolkit import fsutil
from kdtoolkit.bundle.common import (
    BUNDLE_ARCHIVES,
    BUNDLE_SCHEMA,
    BUNDLE_SCHEMA_VERSION,
    MANIFEST,
    SCHEMA_FILE,
    TOLERANCE,
)
from kdtoolkit.errors import CheckFailed, InputError, MissingDependency


def open_bundle(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    """A bundle folder as is, or a .tar.gz unpacked into a temp folder (the caller removes it)."""
    p = Path(path)
    if p.is_file() and p.name.endswith(BUNDLE_ARCHIVES):
        tmp = Path(tempfile.mkdtemp(prefix="kdt-bundle-"))
        fsutil.extract_tar(p, tmp, "bundle")
        subs = [d for d in tmp.iterdir() if d.is_dir()]
        root = subs[0] if len(subs) == 1 and not (tmp / MANIFEST).exists() else tmp
        return root, tmp
    if not p.is_dir():
        raise InputError(f"bundle not found: {p}")
    return p, None

def load_manifest(root: Path) -> dict[str, Any]:
    mp = root / MANIFEST
    if not mp.is_file():
        raise InputError(f"{root}: not a bundle (no {MANIFEST})")
    try:
        m = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{mp}: unreadable manifest ({exc})") from None
    if not isinstance(m, dict) or not str(m.get("schema", "")).startswith(BUNDLE_SCHEMA + "/"):
        raise InputError(f"{mp}: not a kdtoolkit bundle manifest (schema {m.get('schema') if isinstance(m, dict) else None!r}, "
                         f"expected {BUNDLE_SCHEMA}/{BUNDLE_SCHEMA_VERSION})")
    v = m.get("schema_version")
    if not isinstance(v, int):
        raise InputError(f"{mp}: schema_version missing or not an integer")
    if v > BUNDLE_SCHEMA_VERSION:
        raise InputError(f"{mp}: bundle schema version {v} is newer than this kdtoolkit supports "
                         f"({BUNDLE_SCHEMA_VERSION}); upgrade kdtoolkit to verify it")
    return m

def verify_bundle(path: str | os.PathLike[str], *, runtime: str | None = None, emit: Any = print) -> list[tuple[bool, str]]:
    """Re-check hashes, the manifest schema, load the model and compare the reference outputs.

    Emits one ``OK name`` / ``FAIL name: why`` line per check and returns them; raises InputError
    for an unusable bundle (exit 2) and CheckFailed when any check failed (exit 1).
    """
    root, tmp = open_bundle(path)
    try:
        m = load_manifest(root)
        results: list[tuple[bool, str]] = []

        def check(ok: bool, name: str, why: str = "") -> bool:
            line = f"{'OK  ' if ok else 'FAIL'} {name}" + (f": {why}" if why else "")
            results.append((ok, line))
            emit(line)
            return ok

        check(True, f"schema {m['schema']}")
        sch = validate_manifest(m)
        if sch is not None:
            check(not sch, "manifest matches bundle-manifest.schema.json", sch or "")
        files = m.get("files") or {}
        if not files:
            check(False, "files", "the manifest lists no files")
        for rel, entry in files.items():
            f = root / rel
            if not f.is_file():
                check(False, f"hash {rel}", "missing")
            else:
                got = fsutil.sha256_file(f)
                check(got == entry.get("sha256"), f"hash {rel}", "" if got == entry.get("sha256") else
                      f"sha256 {got[:12]}... differs from the manifest's {str(entry.get('sha256'))[:12]}... (file changed)")
        listed = set(files) | {MANIFEST}
        extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in listed)
        if extra:
            emit(f"note: files not in the manifest (not checked): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        _check_model(root, m, runtime or (m.get("runtime") or {}).get("name") or "onnxruntime", check)
        from kdtoolkit.backends.device_report import check_device_report

        for ok, name, why in check_device_report(root, m):  # the device's own figures, when the device wrote them
            check(ok, name, why)
        failed = [line for ok, line in results if not ok]
        if failed:
            raise CheckFailed(f"bundle {path}: {len(failed)} of {len(results)} checks failed ({failed[0][5:]})")
        return results
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

def validate_manifest(m: dict[str, Any]) -> str | None:
    """'' when the manifest matches the JSON schema, the first problem otherwise; None without jsonschema."""
    try:
        import jsonschema
    except ImportError:
        return None
    schema = json.loads(SCHEMA_FILE.read_text())
    errs = sorted(jsonschema.Draft202012Validator(schema).iter_errors(m), key=lambda e: list(e.absolute_path))
    if not errs:
        return ""
    e = errs[0]
    return f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:200]}"

def _check_model(root: Path, m: dict[str, Any], runtime: str, check: Any) -> None:
    import numpy as np

    ref = m.get("reference") or {}
    tol = ref.get("tolerance") or TOLERANCE["fp32"]
    try:
        x = np.load(root / ref["input"], allow_pickle=False)
        want = np.load(root / ref["expected"], allow_pickle=False)
    except (KeyError, OSError, ValueError) as exc:
        check(False, "reference batch", f"cannot read it ({exc})")
        return
    if runtime == "tensorrt":
        tol = ref.get("tolerance_engine") or tol  # the engine's precision, against expected logits from ONNX Runtime
        engine = (m.get("runtime") or {}).get("engine")
        if not engine or not (root / engine).is_file():
            check(False, "load tensorrt", "the bundle has no engine plan (build it on the device: build_on_device.sh); "
                                          "use --runtime onnxruntime to check the ONNX")
            return
        try:
            got = _run_tensorrt(root / engine, m, x)
        except MissingDependency:
            raise
        except Exception as exc:
            check(False, f"load tensorrt {engine}", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            return
        check(True, f"load tensorrt {engine}")
    else:
        onnx_rel = (m.get("runtime") or {}).get("onnx") or (m.get("model") or {}).get("file")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependency(f"onnxruntime is needed to run the bundle's ONNX ({exc}); pip install onnxruntime") from exc
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(root / onnx_rel), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            check(False, f"load onnxruntime {onnx_rel}", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return
        check(True, f"load onnxruntime {onnx_rel}")
        names_in = [i.name for i in sess.get_inputs()]
        names_out = [o.name for o in sess.get_outputs()]
        want_in = [i["name"] for i in m.get("inputs", [])]
        want_out = [o["name"] for o in m.get("outputs", [])]
        check(names_in == want_in and names_out == want_out, "input/output names",
              "" if names_in == want_in and names_out == want_out else f"model has {names_in} -> {names_out}, manifest says {want_in} -> {want_out}")
        outs = sess.run(None, {names_in[0]: x.astype(np.float32)})
        got = outs[0]
        if (m.get("postprocessing") or {}).get("kind") == "raw":  # not class logits: every output within tolerance, no top-1
            _check_outputs(root, ref, dict(zip(names_out, outs)), tol, len(x), runtime, check)
            return
    if got.shape != want.shape:
        check(False, "reference outputs", f"shape {got.shape} differs from the expected {want.shape}")
        return
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    close = bool(np.allclose(got, want, atol=tol["atol"], rtol=tol["rtol"]))
    agree = int((got.argmax(1) == want.argmax(1)).sum())
    check(close, f"reference outputs ({len(x)} images, {runtime})",
          f"max |diff| {diff:.3g} (atol {tol['atol']}, rtol {tol['rtol']}), top-1 {agree}/{len(x)} agree")
    check(agree == len(x), "reference top-1", f"{agree}/{len(x)} agree with the expected classes")

def _check_outputs(root: Path, ref: dict[str, Any], got: dict[str, Any], tol: dict[str, float], n: int, runtime: str,
                   check: Any) -> None:
    """Raw outputs (not class logits): each output against its expected values within the tolerance; top-1 is skipped."""
    import numpy as np

    expected = ref.get("expected_outputs") or {}
    if not expected:
        check(False, "reference outputs", "the manifest lists no expected_outputs for its raw outputs")
        return
    for name, rel in expected.items():
        if name not in got:
            check(False, f"reference output {name}", "the model has no such output")
            continue
        try:
            want = np.load(root / rel, allow_pickle=False)
        except (OSError, ValueError) as exc:
            check(False, f"reference output {name}", f"cannot read {rel} ({exc})")
            continue
        g = np.asarray(got[name])
        if g.shape != want.shape:
            check(False, f"reference output {name}", f"shape {g.shape} differs from the expected {want.shape}")
            continue
        diff = float(np.max(np.abs(g - want))) if g.size else 0.0
        check(bool(np.allclose(g, want, atol=tol["atol"], rtol=tol["rtol"])), f"reference output {name} ({n} images, {runtime})",
              f"max |diff| {diff:.3g} (atol {tol['atol']}, rtol {tol['rtol']})")
    check(True, "reference top-1", "skipped: the outputs are not class logits")

def _run_tensorrt(plan: Path, m: dict[str, Any], x: Any) -> Any:
    """Run the engine on the reference batch with the engine module's runner (named tensors, execute_async_v3)."""
    from kdtoolkit.backends.trt.lazy import load_tensorrt
    from kdtoolkit.backends.trt.runner import TrtRunner

    try:
        load_tensorrt()
    except MissingDependency as exc:
        raise MissingDependency(f"{exc} (or use --runtime onnxruntime to check the bundle's ONNX)") from None
    with TrtRunner(plan) as runner:
        return runner(x)
