"""A model whose outputs are not class logits (tests/usercode/user_models.py ``Detector``: a dict of boxes and scores).

Distillation is refused in the preflight with a message that names ``--no-student``; ``compress --no-student`` takes it
through export, INT8 with calibration, the checks and the bundle, with every output named, compared output by output
(no top-1) and listed in the bundle manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

USERCODE = Path(__file__).parent / "usercode"
sys.path.insert(0, str(USERCODE))
import user_models  # noqa: E402

FAST = ("--iters", "5", "--test-limit", "128", "--train-limit", "256")


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(USERCODE), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "kdtoolkit", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("det") / "det.pt"
    torch.save(user_models.Detector(), path)
    return path


def test_distillation_is_refused_and_the_refusal_names_no_student(detector, tmp_path):
    run = tmp_path / "run"
    r = _cli("compress", str(detector), "--trust-pickle", "--profile", "jetson-agx", "--data", "mnist-mini", *FAST, "--out", str(run))
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--no-student" in errors[0] and "not class logits" in errors[0], r.stderr
    assert not run.exists()


@pytest.mark.parametrize("profile", ["jetson-agx", "cpu"])
def test_no_student_exports_quantizes_checks_and_bundles_every_output(detector, tmp_path, profile):
    run = tmp_path / "run"
    r = _cli("compress", str(detector), "--trust-pickle", "--no-student", "--profile", profile, "--data", "mnist-mini", *FAST,
             "--out", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "n/a" in r.stdout

    export = json.loads((run / "03-export-teacher" / "manifest.json").read_text())
    assert export["info"]["outputs"]["names"] == ["boxes", "scores"]
    assert [t["shape"][0] for t in export["info"]["outputs"]["tensors"]] == ["batch", "batch"]
    parity = export["metrics"]["parity"]
    assert parity["top1_agreement"] is None and set(parity["by_output"]) == {"boxes", "scores"} and parity["max_abs_diff"] < 1e-4

    q = json.loads((run / "05-quantize" / "manifest.json").read_text())
    assert q["config"]["method"] == "ptq" and q["metrics"]["accuracy_int8"] is None
    assert set(q["metrics"]["output_fidelity"]) == {"boxes", "scores"}
    assert "skipped" in q["info"]["quantization"]["fallback"]
    assert "accuracy could not be measured" in q["metrics"]["precision_reason"]
    if profile == "jetson-agx":
        assert q["metrics"]["precision"] == "int8"  # the TensorRT target gets the Q/DQ model, as for classifiers

    summary = json.loads((run / "summary.json").read_text())
    assert summary["teacher"]["accuracy"] is None and summary["student"]["accuracy"] is None
    assert summary["accuracy_drop_points"] is None
    assert "n/a" in (run / "report.md").read_text()

    m = json.loads((run / "bundle" / "manifest.json").read_text())
    assert [o["name"] for o in m["outputs"]] == ["boxes", "scores"]
    assert all(o["shape"][0] == "batch" for o in m["outputs"])
    assert m["postprocessing"]["kind"] == "raw" and m["postprocessing"]["outputs"] == ["boxes", "scores"]
    assert m["classes"] == [] and m["metrics"]["accuracy"]["value"] is None
    assert set(m["reference"]["expected_outputs"]) == {"boxes", "scores"}

    v = _cli("verify", str(run / "bundle"))
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    assert "reference output boxes" in v.stdout and "reference output scores" in v.stdout

    # a changed expected output fails verify
    import numpy as np

    rel = m["reference"]["expected_outputs"]["scores"]
    p = run / "bundle" / rel
    np.save(p, np.load(p) + 1.0)
    assert _cli("verify", str(run / "bundle")).returncode == 1
