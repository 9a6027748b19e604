"""The CI gate: real interleaved re-measurement, stored-JSON mode with environment checks, exit codes,
JUnit and Markdown outputs. Few rounds to stay fast; thresholds are chosen so noise cannot flip them."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import run_cli
from test_latency import _tiny

from kdtoolkit.errors import InputError


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gate")
    small = _tiny(0.25, d / "small.onnx")
    copy = d / "small_copy.onnx"
    copy.write_bytes(small.read_bytes())
    return {"small": small, "copy": copy, "big": _tiny(1.5, d / "big.onnx")}


@pytest.fixture(scope="session")
def stored(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stored") / "base.json"
    r = run_cli("profile", str(models["small"]), "--batch", "1", "--iters", "40", "--warmup", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_parse_percent():
    from kdtoolkit.gate import parse_percent

    assert parse_percent("5%") == pytest.approx(0.05) and parse_percent("12.5") == pytest.approx(0.125)
    assert parse_percent(None) is None
    with pytest.raises(InputError, match="percentage"):
        parse_percent("fast")


def test_compare_statistics():
    import numpy as np

    from kdtoolkit.latency.stats import compare

    rng = np.random.default_rng(0)
    base = 1.0 + rng.exponential(0.05, 200)
    same = compare(base, rng.permutation(base), quantile=0.1)
    assert same["ratio"] == pytest.approx(1.0) and same["p_slower"] > 0.1
    slow = compare(base, base * 1.3, quantile=0.1)
    assert slow["ratio"] == pytest.approx(1.3, rel=0.01) and slow["p_slower"] < 1e-6


def test_aa_in_job_passes(models, tmp_path):
    from kdtoolkit.gate import GateSettings, run_gate

    r = run_gate(str(models["copy"]), str(models["small"]), GateSettings(max_slowdown=0.25, iters=60, warmup=3))
    assert r.verdict == "pass" and r.mode == "in-job"
    (c,) = [c for c in r.checks if c["kind"] == "latency"]
    assert c["n_baseline"] == c["n_candidate"] == 60 and 0 <= c["p_slower"] <= 1
    assert [c["status"] for c in r.checks if c["kind"] == "accuracy"] == ["skipped"]


def test_large_real_slowdown_fails_with_junit_and_summary(models, tmp_path):
    junit, summary, js = tmp_path / "gate.xml", tmp_path / "summary.md", tmp_path / "gate.json"
    summary.write_text("earlier step\n")
    r = run_cli("gate", str(models["big"]), "--baseline", str(models["small"]), "--iters", "40", "--warmup", "3",
                "--max-slowdown", "50%", "--junit", str(junit), "--summary", str(summary), "--json", str(js))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "regression" in r.stderr and "Traceback" not in r.stderr
    suite = ET.parse(junit).getroot()
    assert suite.tag == "testsuite" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["latency b1"].find("failure") is not None and cases["accuracy"].find("skipped") is not None
    md = summary.read_text()
    assert md.startswith("earlier step\n") and "kdtoolkit gate: REGRESSION" in md and "| latency b1 |" in md and "**FAIL**" in md
    g = json.loads(js.read_text())
    assert g["verdict"] == "regression" and g["checks"][0]["ratio"] > 1.5
    raw = g["profiles"]["baseline"]["results"]
    assert len(raw["baseline"]["1"]["samples_ms"]) == 40 and len(raw["candidate"]["1"]["samples_ms"]) == 40


def test_accuracy_drop_is_a_regression(models, tmp_path):
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.gate import GateSettings, run_gate

    arts = {}
    for name, acc in (("base", 0.90), ("cand", 0.88)):
        with ArtifactWriter(tmp_path / name, kind="onnx", stage="optimize") as w:
            w.path("model.onnx").write_bytes(models["small"].read_bytes())
            w.metrics["accuracy"] = acc
        arts[name] = str(tmp_path / name)
    r = run_gate(arts["cand"], arts["base"], GateSettings(max_slowdown=5.0, iters=20, warmup=2, max_accuracy_drop=0.5))
    (acc,) = [c for c in r.checks if c["kind"] == "accuracy"]
    assert acc["status"] == "fail" and acc["drop_points"] == pytest.approx(2.0) and r.verdict == "regression"
    ok = run_gate(arts["cand"], arts["base"], GateSettings(max_slowdown=5.0, iters=20, warmup=2, max_accuracy_drop=3.0))
    assert ok.verdict == "pass"


def test_stored_json_mode(models, stored, tmp_path):
    js = tmp_path / "g.json"
    r = run_cli("gate", str(models["small"]), "--baseline", str(stored), "--iters", "40", "--warmup", "2", "--json", str(js))
    assert r.returncode in (0, 1), r.stderr  # same model measured in another process: the verdict is the benchmark's business
    g = json.loads(js.read_text())
    assert g["mode"] == "stored" and g["settings"]["max_slowdown"] == pytest.approx(0.30)
    assert any("wider threshold" in n for n in g["notes"])


def test_stored_json_from_another_device_exit_2(models, stored, tmp_path):
    doc = json.loads(stored.read_text())
    doc["environment"]["cpu"]["model"] = "Imaginary CPU 9000"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    r = run_cli("gate", str(models["small"]), "--baseline", str(other), "--iters", "10", "--warmup", "1")
    assert r.returncode == 2 and "another device" in r.stderr and "Imaginary CPU 9000" in r.stderr
    r = run_cli("gate", str(models["small"]), "--baseline", str(other), "--iters", "10", "--warmup", "1", "--allow-env-mismatch")
    assert r.returncode in (0, 1), r.stderr
    assert "environment differs (allowed)" in r.stdout


def test_both_stored_and_names(stored, tmp_path):
    from kdtoolkit.gate import GateSettings, run_gate

    r = run_gate(f"{stored}:small", str(stored), GateSettings())
    assert r.mode == "stored" and r.verdict == "pass" and r.checks[0]["ratio"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="no model 'nope'"):
        run_gate(f"{stored}:nope", str(stored))


@pytest.mark.parametrize("content,msg", [("", "empty"), ('{"schema": "kdtoolkit.profile/1", "results": {"a": {"1": {"samples_ms": [1', "truncated"),
                                         ('{"schema": "kdtoolkit.profile/7", "results": {}}', "unsupported profile schema"),
                                         ('{"hello": 1}', "not a kdtoolkit profile JSON")])
def test_bad_json_exit_2(models, tmp_path, content, msg):
    bad = tmp_path / "b.json"
    bad.write_text(content)
    r = run_cli("gate", str(models["small"]), "--baseline", str(bad))
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_unloadable_and_bad_flags_exit_2(models, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    r = run_cli("gate", str(bad), "--baseline", str(models["small"]), "--iters", "5")
    assert r.returncode == 2 and "cannot load" in r.stderr
    r = run_cli("gate", str(models["small"]), "--baseline", str(tmp_path / "missing.onnx"))
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_cli("gate", str(models["small"]), "--baseline", str(models["copy"]), "--max-slowdown", "lots")
    assert r.returncode == 2 and "percentage" in r.stderr


def test_profile_artifact_folder_as_stored_side(stored, tmp_path):
    from kdtoolkit.gate import GateSettings, run_gate

    folder = tmp_path / "07-profile"
    folder.mkdir()
    (folder / "profile.json").write_text(stored.read_text())
    r = run_gate(f"{folder}:small", str(stored), GateSettings())
    assert r.mode == "stored" and r.verdict == "pass"
