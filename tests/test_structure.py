"""The layering DESIGN.md asks for: no import cycles between the parts that were split."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kdtoolkit"


def _imports(rel: str) -> set[str]:
    tree = ast.parse((PKG / rel).read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_quant_has_no_ptq_qat_cycle():
    assert not {m for m in _imports("quant/qat.py") if m.startswith("kdtoolkit.quant.ptq")}
    assert not {m for m in _imports("quant/calib.py") if m.startswith(("kdtoolkit.quant.ptq", "kdtoolkit.quant.qat"))}


def test_backends_layering():
    # the protocol and the lazy TensorRT handle sit below every backend; the factory above them
    assert not {m for m in _imports("backends/base.py") if m.startswith("kdtoolkit.backends")}
    assert not {m for m in _imports("backends/trt/lazy.py") if m.startswith("kdtoolkit.backends")}
    for mod in ("ort.py", "pytorch.py", "trt/runner.py", "trt/builder.py", "trt/config.py", "trt/calibrator.py", "trt/commands.py"):
        assert "kdtoolkit.backends.factory" not in _imports(f"backends/{mod}"), mod
    assert "kdtoolkit.backends.trt.builder" not in _imports("backends/trt/runner.py")


def test_bundle_does_not_import_the_pipeline():
    for f in sorted((PKG / "bundle").glob("*.py")):
        assert "kdtoolkit.pipeline" not in _imports(f"bundle/{f.name}"), f.name
