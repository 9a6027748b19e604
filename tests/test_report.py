"""Reports: report.md / report.html with real PNG plots, rebuilt by `kdtoolkit report RUN_DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from test_latency import _tiny


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A compress-shaped run folder: summary.json plus a real profile artifact with raw samples."""
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.latency.session import build_document
    from kdtoolkit.latency.timing import measure

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


# --- the report renders whole ------------------------------------------------------------------------

_PROXY = "onnxruntime-cpu (proxy for a TensorRT target: not measured on the device)"  # the longest real runtime label


def _one_panel(run_dir: Path) -> Path:
    """The same run cut to one batch size with the TensorRT-proxy label: the case whose title was cut off."""
    s = json.loads((run_dir / "summary.json").read_text())
    for who in ("teacher", "student"):
        s[who]["latency_by_batch"] = {"1": s[who]["latency_by_batch"]["1"]}
    s["speedup"] = {"b1": s["speedup"]["b1"]}
    s["latency_runtime"] = _PROXY
    s["profile"], s["backend"] = "jetson-agx-orin", "tensorrt"
    (run_dir / "summary.json").write_text(json.dumps(s))
    return run_dir


def _outside(extent, fig_bbox, tol: float = 1.0) -> bool:
    return (extent.x0 < fig_bbox.x0 - tol or extent.x1 > fig_bbox.x1 + tol
            or extent.y0 < fig_bbox.y0 - tol or extent.y1 > fig_bbox.y1 + tol)


@pytest.mark.parametrize("batches", [("1",), ("1", "4")])
def test_pareto_titles_and_labels_lie_inside_the_figure(batches):
    """Every title, axis label and point label is inside the figure itself, before any crop at save time."""
    import matplotlib.pyplot as plt

    from kdtoolkit.report import pareto_figure

    pts = [{"name": "teacher", "label": "teacher", "accuracy": 0.9394, "latency": {b: 8.3 * int(b) for b in batches},
            "session": "profile"},
           {"name": "student", "label": "student (int8)", "accuracy": 0.8236, "latency": {b: 1.3 * int(b) for b in batches},
            "session": "profile"}]
    fig = pareto_figure(pts, _PROXY)
    try:
        r = fig.canvas.get_renderer()
        texts = [fig._suptitle] + [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts)]
        assert fig._suptitle is not None and "Latency: onnxruntime-cpu" in fig._suptitle.get_text()
        for t in texts:
            if t.get_visible() and t.get_text():
                ext = t.get_window_extent(r)
                assert not _outside(ext, fig.bbox), f"{t.get_text()!r} at {ext} leaves the figure {fig.bbox}"
    finally:
        plt.close(fig)


def test_saved_plots_have_nothing_cut_at_their_edges(run_dir):
    """A title cut off at the sides leaves dark pixels in the image's edge columns; a whole one leaves them white."""
    import numpy as np
    from PIL import Image

    from kdtoolkit.report import LATENCY_PNG, PARETO_PNG, rebuild

    rebuild(_one_panel(run_dir))
    for png in (PARETO_PNG, LATENCY_PNG):
        img = np.asarray(Image.open(run_dir / png).convert("L"))
        for name, strip in (("left", img[:, :3]), ("right", img[:, -3:]), ("top", img[:3]), ("bottom", img[-3:])):
            assert strip.min() > 200, f"{png}: something is drawn across its {name} edge"


def _chromium() -> str | None:
    import shutil

    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_report_html_renders_whole_in_headless_chromium(run_dir, tmp_path):
    """Open report.html in a real headless Chromium: the page loads, every image decodes, nothing overflows."""
    from playwright.sync_api import sync_playwright

    from kdtoolkit.report import rebuild

    rebuild(_one_panel(run_dir))
    page_url = (run_dir / "report.html").resolve().as_uri()
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=_chromium(),
                                                    headless=True, args=args, viewport={"width": 1280, "height": 900},
                                                    timeout=60_000)
        try:
            page = ctx.new_page()
            failed: list[str] = []
            page.on("requestfailed", lambda req: failed.append(req.url))
            resp = page.goto(page_url, wait_until="load", timeout=60_000)
            assert resp is None or resp.ok
            assert page.title() == "kdtoolkit report: jetson-agx-orin"
            assert "kdtoolkit run: profile" in page.inner_text("h1")
            imgs = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.getAttribute('src'), complete: e.complete, w: e.naturalWidth, "
                       "h: e.naturalHeight, shown: e.getBoundingClientRect().width}))")
            assert [i["src"] for i in imgs] == ["report_pareto.png", "report_latency.png"]
            for i in imgs:
                assert i["complete"] and i["w"] > 0 and i["h"] > 0, f"{i['src']} did not load: {i}"
                assert i["shown"] > 300, f"{i['src']} is drawn too small to read: {i}"
            assert not failed, f"requests failed: {failed}"
            # the page fits its width: no image or table pushes past the viewport
            assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
            shot = page.screenshot(full_page=True)
            assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
        finally:
            ctx.close()


def test_stage_rows_say_whose_parity_and_the_int8_accuracy(run_dir):
    """The quantize stage carries the export's torch-vs-ONNX parity; beside an INT8 model it must not read as the
    INT8 model's own (5e-7 against torch), and the row shows INT8 top-1 against FP32."""
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.report import stage_rows

    with ArtifactWriter(run_dir / "04-quantize", kind="onnx", stage="quantize") as w:
        w.path("model.onnx").write_bytes(b"x")
        w.metrics.update({"precision": "int8", "accuracy_fp32": 0.9012, "accuracy_int8": 0.8977,
                          "parity": {"n": 10, "max_abs_diff": 5.1e-07, "top1_agreement": 1.0}})
    s = json.loads((run_dir / "summary.json").read_text())
    s["stages"] = {"quantize": str(run_dir / "04-quantize"), **s["stages"]}
    facts = {r["stage"]: r["facts"] for r in stage_rows(run_dir, s)}
    assert facts["quantize"] == "top-1 INT8 89.77 % (FP32 90.12 %), int8, FP32 export parity max abs diff 5.1e-07"
    assert facts["optimize"] == "top-1 91.00 %, 1,234 params, fp32"
