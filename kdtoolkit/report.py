"""Human reports of a compress run: ``report.md`` and ``report.html`` with matplotlib plots beside them.

Everything shown is read from what the run measured (summary.json, the stage manifests and the
profile artifact's raw samples); nothing is estimated here. ``kdtoolkit report RUN_DIR`` rebuilds
the files from the run folder alone.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError

PARETO_PNG = "report_pareto.png"
LATENCY_PNG = "report_latency.png"
_COLORS = {"teacher": "#1f77b4", "student": "#2ca02c", "int8": "#d62728"}


# --- reading the run --------------------------------------------------------------------------------

def _stage_dir(run_dir: Path, name: str, recorded: str | None = None) -> Path:
    """A stage's folder, found by stage name inside the run (kdtoolkit.run.RunDir); a summary written with
    another folder layout names its folders itself (``stages``), found beside it even when the run was moved."""
    from kdtoolkit.run import RunDir

    try:
        canonical = RunDir(run_dir).folder(name)
    except InputError:
        canonical = None
    if canonical is not None and (canonical / "manifest.json").is_file():
        return canonical
    if recorded:
        local = run_dir / Path(recorded).name
        return local if local.exists() else Path(recorded)
    return canonical or run_dir / name


def _manifest(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    from kdtoolkit.run import RunSummary

    return RunSummary.load(run_dir).to_dict()


def points(run_dir: Path, s: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy/latency points: teacher and student (one interleaved profile run), and INT8 when a quantize stage made one."""
    out = []
    for who in ("teacher", "student"):
        r = s[who]
        label = who if who == "teacher" else f"student ({r.get('precision') or 'fp32'})"
        out.append({"name": who, "label": label, "accuracy": r["accuracy"],
                    "latency": {str(b): v["p50"] for b, v in r["latency_by_batch"].items()}, "session": "profile"})
    int8 = s.get("int8")
    if isinstance(int8, dict) and "accuracy" in int8 and "latency_by_batch" in int8:
        out.append({"name": "int8", "label": "INT8", "accuracy": int8["accuracy"],
                    "latency": {str(b): v["p50"] for b, v in int8["latency_by_batch"].items()}, "session": "profile"})
    elif "quantize" in s.get("stages", {}) and (s.get("student") or {}).get("precision") != "int8":
        man = _manifest(_stage_dir(run_dir, "quantize", s["stages"]["quantize"])) or {}
        m = man.get("metrics", {})
        lat = (m.get("precision_latency_ms") or {}).get("int8")
        if m.get("accuracy_int8") is not None and lat:
            out.append({"name": "int8", "label": "INT8 (not chosen; timed in the quantize stage)", "accuracy": m["accuracy_int8"],
                        "latency": {str(b): v["p50"] for b, v in lat.items()}, "session": "quantize"})
    return out


def profile_samples(run_dir: Path, s: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Raw latency samples per model and batch from the profile artifact (empty if it is gone)."""
    rec = s.get("stages", {}).get("profile")
    if not rec:
        return {}
    p = _stage_dir(run_dir, "profile", rec) / "profile.json"
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {name: {str(b): st["samples_ms"] for b, st in per.items() if "samples_ms" in st} for name, per in doc.get("results", {}).items()}


def stage_rows(run_dir: Path, s: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, rec in s.get("stages", {}).items():
        d = _stage_dir(run_dir, name, rec)
        man = _manifest(d) or {}
        m = man.get("metrics", {})
        size = sum(f.get("size", 0) for f in man.get("files", {}).values())
        facts = []
        if isinstance(m.get("accuracy"), (int, float)):
            facts.append(f"top-1 {100 * m['accuracy']:.2f} %")
        elif isinstance(m.get("accuracy_int8"), (int, float)) and isinstance(m.get("accuracy_fp32"), (int, float)):
            facts.append(f"top-1 INT8 {100 * m['accuracy_int8']:.2f} % (FP32 {100 * m['accuracy_fp32']:.2f} %)")
        if isinstance(m.get("params"), int):
            facts.append(f"{m['params']:,} params")
        if m.get("precision"):
            facts.append(str(m["precision"]))
        if isinstance(m.get("parity"), dict) and "max_abs_diff" in m["parity"]:
            # the export's torch-vs-ONNX parity is carried by later stages; beside an INT8 model it is not the INT8's
            whose = "" if m.get("precision") in (None, "fp32") else "FP32 export "
            facts.append(f"{whose}parity max abs diff {m['parity']['max_abs_diff']:.2g}")
        if isinstance(m.get("train_time_s"), (int, float)):
            facts.append(f"trained {m['train_time_s']:.0f} s")
        rows.append({"stage": name, "folder": d.name, "kind": man.get("kind", "?"), "created": man.get("created", "?"),
                     "skipped": name in s.get("skipped", []), "size_bytes": size, "facts": ", ".join(facts)})
    return rows


# --- plots ------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fit_suptitle(fig: Any, text: str, fontsize: float) -> Any:
    """A figure title wrapped to the figure's width.

    A centred suptitle wider than the figure is cut off on both sides (seen with one panel and a long
    runtime label such as "onnxruntime-cpu (proxy for a TensorRT target: ...)"); wrap until it fits.
    """
    import textwrap

    renderer = fig.canvas.get_renderer()
    fig_w = fig.bbox.width
    title = fig.suptitle(text, fontsize=fontsize)
    width = len(text)
    while title.get_window_extent(renderer).width > 0.96 * fig_w and width > 20:
        width = int(width * 0.85)
        title.set_text("\n".join(textwrap.wrap(text, width)))
    return title


def _save(fig: Any, path: Path) -> None:
    """Save with the canvas grown to hold every label: nothing drawn is ever cut at the edge."""
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight", pad_inches=0.15)


def plot_pareto(pts: list[dict[str, Any]], path: Path, runtime: str) -> Path:
    """Top-1 against p50 latency, one panel per batch size; the Pareto front joins the undominated points."""
    plt = _plt()
    fig = pareto_figure(pts, runtime)
    _save(fig, path)
    plt.close(fig)
    return path


def pareto_figure(pts: list[dict[str, Any]], runtime: str) -> Any:
    """The accuracy-against-latency figure itself (laid out, not saved), so tests can check its text fits."""
    plt = _plt()
    batches = sorted(pts[0]["latency"], key=int)  # the profile session's batch sizes (teacher and student)
    # constrained layout makes room for the suptitle and labels; one panel gets a wider figure than 5.2 in
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.4, 5.2 * len(batches)), 4.6), squeeze=False,
                             layout="constrained")
    for ax, b in zip(axes[0], batches):
        here = [p for p in pts if b in p["latency"]]
        xy = [(p["latency"][b], 100 * p["accuracy"]) for p in here]
        xr = max(x for x, _ in xy) or 1.0
        yr = (max(y for _, y in xy) - min(y for _, y in xy)) or 1.0
        for p, (x, y) in zip(here, xy):
            ax.scatter([x], [y], s=90, color=_COLORS.get(p["name"], "grey"), zorder=3, edgecolor="black", linewidth=0.6)
            # a neighbour close by and above: put this label below the point so the two do not overlap
            below = any(abs(qx - x) < 0.3 * xr and 0 <= qy - y < 0.25 * yr and (qx, qy) != (x, y) for qx, qy in xy)
            ax.annotate(f"{p['label']}\n{x:.2f} ms, {y:.1f} %", (x, y), textcoords="offset points",
                        xytext=(8, -22) if below else (8, 3), fontsize=8)
        front = sorted(((p["latency"][b], 100 * p["accuracy"]) for p in here), key=lambda t: (t[0], -t[1]))
        best, line = -1.0, []
        for x, y in front:
            if y > best:
                line.append((x, y))
                best = y
        if len(line) > 1:
            ax.plot([t[0] for t in line], [t[1] for t in line], "--", color="grey", zorder=1, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        xs = [p["latency"][b] for p in here]
        ys = [100 * p["accuracy"] for p in here]
        ax.set_xlim(0, max(xs) * 1.45)
        pad = max(1.0, (max(ys) - min(ys)) * 0.3)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
        ax.set_xlabel(f"p50 latency at batch {b} (ms)")
        ax.set_ylabel("top-1 on the test split (%)")
        ax.set_title(f"accuracy vs latency, batch {b}")
        ax.grid(alpha=0.3)
    _fit_suptitle(fig, f"Up and to the left is better. Latency: {runtime}", fontsize=9)
    fig.canvas.draw()  # run the layout now, so callers (and tests) see the final positions
    return fig


def plot_latency(samples: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Box plots of the raw interleaved samples per batch: the spread and tail, not just the median."""
    plt = _plt()
    names = list(samples)
    batches = sorted({b for per in samples.values() for b in per}, key=int)
    fig, axes = plt.subplots(len(batches), 1, figsize=(8, 1.2 + 1.3 * len(names) * len(batches)), squeeze=False,
                             layout="constrained")
    for ax, b in zip(axes[:, 0], batches):
        data = [samples[n][b] for n in names if b in samples[n]]
        labels = [n for n in names if b in samples[n]]
        bp = ax.boxplot(data, vert=False, whis=(1, 99), showfliers=True, patch_artist=True,
                        flierprops={"markersize": 2, "alpha": 0.4}, medianprops={"color": "black"})
        ax.set_yticks(range(1, len(labels) + 1), labels)
        for patch, n in zip(bp["boxes"], labels):
            patch.set_facecolor(_COLORS.get(n, "lightgrey"))
            patch.set_alpha(0.6)
        import numpy as np

        for i, d in enumerate(data, start=1):
            med = float(np.median(d))
            ax.annotate(f"p50 {med:.2f} ms (n={len(d)})", (med, i), textcoords="offset points", xytext=(0, 14),
                        ha="center", fontsize=8)
        ax.set_ylim(0.4, len(labels) + 0.8)
        lo, hi = min(min(d) for d in data), max(max(d) for d in data)
        log = lo > 0 and hi / lo > 5  # a long tail (a loaded machine) would squash the boxes on a linear axis
        if log:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.set_xlabel(f"latency per batch of {b} (ms{', log scale' if log else ''}); whiskers p1-p99, dots beyond")
        ax.grid(axis="x", alpha=0.3)
    _fit_suptitle(fig, "Latency distributions (raw samples, models interleaved in one process)", fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return path


# --- documents --------------------------------------------------------------------------------------

def _pct(v: Any) -> str:
    """A top-1 fraction as a percentage; "n/a" where it was not measured (outputs that are not class logits)."""
    return f"{100 * v:.2f} %" if isinstance(v, (int, float)) else "n/a"


def _drop_text(s: dict[str, Any]) -> str:
    d = s.get("accuracy_drop_points")
    if not isinstance(d, (int, float)):
        return "Accuracy change: n/a (the outputs are not class logits: no top-1)."
    return f"Accuracy change: {-d:+.2f} points."


def _model_rows(s: dict[str, Any], pts: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    bs = sorted(pts[0]["latency"], key=int)
    head = ["model", "top-1 (test)", "params", "size"] + [f"p50 b{b} (ms)" for b in bs]
    rows = []
    for p in pts:
        r = s.get(p["name"]) if p["name"] in ("teacher", "student") else s.get("int8") or {}
        params = r.get("params") if isinstance(r, dict) else None
        size = r.get("size_bytes") if isinstance(r, dict) else None
        rows.append([p["label"], _pct(p["accuracy"]), f"{params:,}" if isinstance(params, int) else "-",
                     f"{size / 1e6:.2f} MB" if isinstance(size, (int, float)) else "-",
                     *[f"{p['latency'][b]:.3f}" if b in p["latency"] else "-" for b in bs]])
    return head, rows


def render_markdown(s: dict[str, Any], pts: list[dict[str, Any]], stages: list[dict[str, Any]], plots: dict[str, str]) -> str:
    head, rows = _model_rows(s, pts)
    cpu = (s.get("environment") or {}).get("model", "?")
    lines = [f"# kdtoolkit run: profile `{s['profile']}` ({s['backend']})", "",
             f"Latency measured with {s['latency_runtime']}, candidates interleaved in one process; CPU: {cpu}.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Speedup (teacher p50 / student p50): " + ", ".join(f"{k}: {v:.2f}x" for k, v in s["speedup"].items()),
              _drop_text(s)]
    fid = (s.get("student") or {}).get("output_fidelity")
    if fid:
        from kdtoolkit.evaluate import fidelity_text

        lines.append(f"Outputs {', '.join(fid)} (not class logits), INT8 against FP32 on the test split: {fidelity_text(fid)}.")
    if any(p["session"] == "quantize" for p in pts):
        lines.append("INT8 latency was measured in the quantize stage's own interleaved session (against the FP32 student), "
                     "not in the profile session.")
    if plots.get("pareto"):
        lines += ["", "## Accuracy against latency", "", f"![accuracy vs latency]({plots['pareto']})"]
    if plots.get("latency"):
        lines += ["", "## Latency distributions", "", f"![latency distributions]({plots['latency']})"]
    lines += ["", "## Stages", "", "| stage | folder | kind | made | size | measured |", "|---|---|---|---|---:|---|"]
    for r in stages:
        made = "skipped: up to date" if r["skipped"] else r["created"]
        lines.append(f"| {r['stage']} | `{r['folder']}` | {r['kind']} | {made} | {r['size_bytes'] / 1e6:.2f} MB | {r['facts'] or '-'} |")
    return "\n".join(lines) + "\n"


def render_html(s: dict[str, Any], pts: list[dict[str, Any]], stages: list[dict[str, Any]], plots: dict[str, str]) -> str:
    e = html.escape
    head, rows = _model_rows(s, pts)
    cpu = (s.get("environment") or {}).get("model", "?")

    def table(h: list[str], rs: list[list[str]]) -> str:
        return ("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in h) + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rs) + "</tbody></table>")

    parts = [f"<h1>kdtoolkit run: profile <code>{e(s['profile'])}</code> ({e(s['backend'])})</h1>",
             f"<p>Latency measured with {e(s['latency_runtime'])}, candidates interleaved in one process; CPU: {e(cpu)}.</p>",
             table(head, rows),
             "<p>Speedup (teacher p50 / student p50): " + e(", ".join(f"{k}: {v:.2f}x" for k, v in s["speedup"].items()))
             + ". " + e(_drop_text(s)) + "</p>"]
    if plots.get("pareto"):
        parts.append(f"<h2>Accuracy against latency</h2><img src=\"{e(plots['pareto'])}\" alt=\"accuracy vs latency\">")
    if plots.get("latency"):
        parts.append(f"<h2>Latency distributions</h2><img src=\"{e(plots['latency'])}\" alt=\"latency distributions\">")
    parts.append("<h2>Stages</h2>" + table(["stage", "folder", "kind", "made", "size", "measured"],
                 [[r["stage"], r["folder"], r["kind"], "skipped: up to date" if r["skipped"] else r["created"],
                   f"{r['size_bytes'] / 1e6:.2f} MB", r["facts"] or "-"] for r in stages]))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "th:first-child,td:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>kdtoolkit report: {e(s['profile'])}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_reports(run_dir: str | Path, summary: dict[str, Any]) -> list[Path]:
    """Write report.md, report.html and the PNG plots into the run folder (atomically); return their paths."""
    from kdtoolkit import fsutil

    run_dir = Path(run_dir)
    pts = points(run_dir, summary)
    samples = profile_samples(run_dir, summary)
    stages = stage_rows(run_dir, summary)
    plots: dict[str, str] = {}
    written: list[Path] = []
    if all(isinstance(p["accuracy"], (int, float)) for p in pts):  # no accuracy axis for outputs that are not logits
        with fsutil.atomic_path(run_dir / PARETO_PNG, suffix=".png") as tmp:
            plot_pareto(pts, tmp, summary.get("latency_runtime", "?"))
        plots["pareto"] = PARETO_PNG
        written.append(run_dir / PARETO_PNG)
    if samples:
        with fsutil.atomic_path(run_dir / LATENCY_PNG, suffix=".png") as tmp:
            plot_latency(samples, tmp)
        plots["latency"] = LATENCY_PNG
        written.append(run_dir / LATENCY_PNG)
    written.append(fsutil.write_text(run_dir / "report.md", render_markdown(summary, pts, stages, plots)))
    written.append(fsutil.write_text(run_dir / "report.html", render_html(summary, pts, stages, plots)))
    return written


def rebuild(run_dir: str | Path) -> list[Path]:
    """`kdtoolkit report RUN_DIR`: rebuild the reports from summary.json and the stage folders."""
    return write_reports(run_dir, load_summary(run_dir))
