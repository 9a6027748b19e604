"""Reports: report.md / report.html with real PNG plots, rebuilt by `kdtoolkit report RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from test_profile import _tiny


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A compress-shaped run folder: summary.json plus a real profile artifact with raw samples."""
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.profile.runners import OrtRunner, measure
    from kdtoolkit.profile.session import build_document

    run = tmp_path / "run"
    t = _tiny(1.0, tmp_path / "teacher.onnx")
    s = _tiny(0.25, tmp_path / "student.onnx")
    with OrtRunner(t, name="teacher") as rt, OrtRunner(s, name="student") as rs:
        res = measure([rt, rs], [1, 4], warmup=1, iters=15)
        doc = build_document([rt, rs], [str(t), str(s)], res, {"batches": [1, 4], "threads": 0})
    from kdtoolkit import fsutil

    with ArtifactWriter(run / "06-profile", kind="profile", stage="profile") as w:
        fsutil.write_json(w.path("profile.json"), doc)
    with ArtifactWriter(run / "05-optimize", kind="onnx", stage="optimize") as w:
        w.path("model.onnx").write_bytes(s.read_bytes())
        w.metrics.update({"accuracy": 0.91, "precision": "fp32", "params": 1234})

    def row(name: str, acc: float, params: int) -> dict:
        lat = {str(b): {"p50": res[name][b]["p50"], "p90": res[name][b]["p90"]} for b in (1, 4)}
        return {"accuracy": acc, "params": params, "macs": None, "size_bytes": 5000, "latency_ms": {**lat["1"], "batch": 1},
                "latency_by_batch": lat}

    summary = {"profile": "ort-cpu", "backend": "onnxruntime", "teacher": row("teacher", 0.93, 50000),
               "student": {**row("student", 0.91, 1234), "precision": "fp32"},
               "speedup": {f"b{b}": res["teacher"][b]["p50"] / res["student"][b]["p50"] for b in (1, 4)},
               "accuracy_drop_points": 2.0, "latency_runtime": "onnxruntime-cpu",
               "stages": {"optimize": str(run / "05-optimize"), "profile": str(run / "06-profile")}, "skipped": ["optimize"],
               "data": {}, "environment": {"model": "Test CPU"}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_write_reports_makes_md_html_and_plots(run_dir):
    from kdtoolkit.report import LATENCY_PNG, PARETO_PNG, rebuild

    paths = rebuild(run_dir)
    assert {p.name for p in paths} == {"report.md", "report.html", PARETO_PNG, LATENCY_PNG}
    for png in (PARETO_PNG, LATENCY_PNG):
        data = (run_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 15_000  # a real plot, not an empty canvas
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# kdtoolkit run: profile `ort-cpu`")
    assert f"![accuracy vs latency]({PARETO_PNG})" in md and f"![latency distributions]({LATENCY_PNG})" in md
    assert "| teacher | 93.00 % |" in md and "| student (fp32) | 91.00 % |" in md
    assert "| optimize | `05-optimize` | onnx | skipped: up to date |" in md and "top-1 91.00 %" in md
    html = (run_dir / "report.html").read_text()
    assert html.startswith("<!doctype html>") and f'<img src="{PARETO_PNG}"' in html and "Test CPU" in html


def test_report_survives_a_moved_run_folder(run_dir, tmp_path):
    from kdtoolkit.report import LATENCY_PNG, rebuild

    moved = tmp_path / "moved"
    run_dir.rename(moved)
    assert (moved / LATENCY_PNG) in rebuild(moved)  # stage paths in summary.json are stale; the folders beside it are used


def test_report_cli(run_dir, tmp_path):
    r = run_cli("report", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "report.html" in r.stdout and (run_dir / "report.html").exists()
    r = run_cli("report", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "no summary.json" in r.stderr
    (run_dir / "summary.json").write_text('{"teacher": ')
    r = run_cli("report", str(run_dir))
    assert r.returncode == 2 and "not valid JSON" in r.stderr
