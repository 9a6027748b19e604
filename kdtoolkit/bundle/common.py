"""Constants and ONNX facts every part of the bundle package uses."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

BUNDLE_SCHEMA = "kdtoolkit.bundle"

BUNDLE_SCHEMA_VERSION = 1

MANIFEST = "manifest.json"

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "schemas" / "bundle-manifest.schema.json"

# the deploy scripts: beside the package in a source checkout, or where KDTOOLKIT_DEPLOY_DIR says (docker image)
DEPLOY_DIR = Path(os.environ.get("KDTOOLKIT_DEPLOY_DIR") or Path(__file__).resolve().parents[2] / "deploy")

DEPLOY_SCRIPTS = ("infer_onnx.py", "infer_tensorrt.py", "build_on_device.sh", "trt_device.py", "device_report.py")

# Reference-output tolerance per precision: the same ONNX on another CPU or ORT build differs by
# float reassociation (fp32), more where reduced precision rounds differently.
TOLERANCE = {"fp32": {"atol": 1e-3, "rtol": 1e-3}, "fp16": {"atol": 5e-2, "rtol": 5e-2}, "int8": {"atol": 0.25, "rtol": 0.05}}

def bundle_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of a bundle folder (by its schema), or None for anything else: a bundle is what users ship, so
    profile, gate, check and build take one where they take an artifact folder."""
    import json

    p = Path(path) / MANIFEST
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and str(doc.get("schema", "")).startswith(f"{BUNDLE_SCHEMA}/") else None


BUNDLE_ARCHIVES = (".tar.gz", ".tgz", ".tar")


def unpacked_bundle(path: str | os.PathLike[str]) -> Path | None:
    """A bundle archive (``bundle --tar``) unpacked once into the kdtoolkit cache (the same cached, atomic unpacking
    as a dataset archive), its files checked once against the manifest's hashes, so gate and profile time it as
    users ship it. None for anything that is not an archive; an archive that is not a bundle, or is damaged, is
    one InputError."""
    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith(BUNDLE_ARCHIVES)):
        return None
    st = p.stat()
    return _unpacked(str(p.resolve()), st.st_size, st.st_mtime_ns, str(p))


@functools.lru_cache(maxsize=8)
def _unpacked(resolved: str, size: int, mtime_ns: int, shown: str) -> Path:
    """unpacked_bundle's work, once per archive version per process: gate resolves a side, times it and reads its
    accuracy, each through unpacked_bundle, and the member listing alone reads the whole compressed stream."""
    from kdtoolkit import fsutil
    from kdtoolkit.data.datasets import extract_archive
    from kdtoolkit.errors import InputError

    p = Path(shown)
    if not _archive_has_manifest(p):
        raise InputError(f"{p}: not a kdtoolkit bundle archive (no {MANIFEST} at its top or in its one top folder)")
    dest = extract_archive(p)
    subs = [d for d in dest.iterdir() if d.is_dir() and not d.name.startswith((".", "__MACOSX"))]
    root = subs[0] if len(subs) == 1 and not (dest / MANIFEST).exists() else dest
    manifest = bundle_manifest(root)
    if manifest is None:
        raise InputError(f"{p}: not a kdtoolkit bundle archive (its {MANIFEST} has no {BUNDLE_SCHEMA}/N schema)")
    checked = dest / ".hashes-checked"
    if not checked.exists():
        for rel, entry in (manifest.get("files") or {}).items():
            want = entry.get("sha256") if isinstance(entry, dict) else None
            f = root / rel
            if want and (not f.is_file() or fsutil.sha256_file(f) != want):
                raise InputError(f"{p}: damaged bundle: {rel} does not match its manifest hash (kdtoolkit verify {p} says more)")
        checked.write_text("ok\n")
    return root


def _archive_has_manifest(p: Path) -> bool:
    """Whether the archive holds manifest.json at its top or one folder down, read from its member list."""
    import tarfile

    from kdtoolkit.errors import InputError

    try:
        with tarfile.open(p) as tf:
            names = tf.getnames()
    except Exception as exc:  # tarfile, gzip and zlib raise several types for a damaged archive
        raise InputError(f"{p}: cannot read archive ({type(exc).__name__}: {exc})") from None
    return any(n.lstrip("./").count("/") <= 1 and n.rsplit("/", 1)[-1] == MANIFEST for n in names)


def bundle_model_file(root: str | os.PathLike[str], manifest: dict[str, Any], *, engines: bool) -> Path:
    """The model a bundle serves: its TensorRT engine when one is there and ``engines`` (TensorRT runs here), the
    manifest's or the one build_on_device.sh writes (model/model.plan); else its ONNX."""
    from kdtoolkit.errors import InputError

    rt = manifest.get("runtime") or {}
    candidates = [rt.get("engine"), "model/model.plan"] if engines else []
    for rel in (*candidates, rt.get("onnx"), (manifest.get("model") or {}).get("file")):
        if rel and (Path(root) / rel).is_file():
            return Path(root) / rel
    raise InputError(f"{root}: bundle names no model file that is there (runtime.engine / runtime.onnx / model.file)")


_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}

_INT8_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"}

def layer_precision(onnx_path: Path) -> dict[str, dict[str, int]]:
    """Precision of each weighted layer group (op type -> precision -> count), read from the graph itself."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    g = m.graph
    producers = {o: n for n in g.node for o in n.output}
    init_types = {i.name: i.data_type for i in g.initializer}
    groups: dict[str, dict[str, int]] = {}
    for n in g.node:
        if n.op_type in _INT8_OPS:
            prec = "int8"
        elif n.op_type in _WEIGHTED_OPS and len(n.input) > 1:
            w = n.input[1]
            src = producers.get(w)
            if src is not None and src.op_type == "DequantizeLinear":
                prec = "int8"
            elif init_types.get(w) == onnx.TensorProto.FLOAT16:
                prec = "fp16"
            else:
                prec = "fp32"
        else:
            continue
        groups.setdefault(n.op_type, {}).setdefault(prec, 0)
        groups[n.op_type][prec] += 1
    return groups

def _io_from_onnx(onnx_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def desc(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return {"name": v.name, "shape": shape, "dtype": dtype}

    return [desc(v) for v in m.graph.input if v.name not in init], [desc(v) for v in m.graph.output]

def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)

def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)[:40]

def _device_name(env: dict[str, Any]) -> str:
    if not env:
        return "unknown"
    if env.get("jetson"):
        return f"Jetson ({env['jetson'].get('l4t')})"
    return env.get("gpu") or (env.get("cpu") or {}).get("model") or "unknown"

def _env_summary(env: dict[str, Any]) -> dict[str, Any]:
    cpu = env.get("cpu") or {}
    return {"device": _device_name(env), "cpu": cpu.get("model"), "arch": cpu.get("arch"), "vnni": cpu.get("vnni"),
            "gpu": env.get("gpu"), "jetson": env.get("jetson"), "tensorrt": env.get("tensorrt"),
            "onnxruntime": env.get("onnxruntime"), "cuda": env.get("cuda"), "torch": env.get("torch"), "onnx": env.get("onnx"),
            "python": env.get("python"), "platform": env.get("platform")}
