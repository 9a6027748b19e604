"""The headline: kdtoolkit against what users do today, measured in one run (issue 9).

Rows, all measured with ONNX Runtime in the same process, interleaved, at batch 1 and 64, with
top-1 on the test split:
  teacher        the fine-tuned ResNet-56 in FP32
  ort_ptq        the teacher quantized with onnxruntime's quantize_static (QDQ, per-channel, u8, MinMax)
  student_alone  the same student as kdtoolkit's, trained on labels alone with the same budget
  kdtoolkit      `compress` output: student + KD + the precision `auto` chose

Resumable: each training run is a `compress` run folder (finished stages are skipped, training
resumes from its checkpoint); the final measurement is cheap and is always redone. ``--row kd`` or
``--row alone`` builds one row's run and stops, so the rows can train apart (one after the other in
separate sessions, or side by side with ``OMP_NUM_THREADS=1`` each); a run without ``--row`` then
finds both finished and measures. Side by side saved little here: measured on this 2-core Xeon, the
KD row took 104 s an epoch and labels alone 93 s beside each other, against 58 s for the KD row on
both cores (the KD row's steps cost more, so the pair is bounded by it). ``--results NAME`` writes the
measurement to benchmarks/results/NAME.json/.md/.png, so an experiment does not replace the headline.

    python benchmarks/reference.py --epochs 60     # the README's run: two trainings of about 50 minutes on 2 idle cores

The student is late-heavy (``--keep-blocks layer1=0,layer2=1,layer3=5``, standard convolutions): no block
at 32x32, one at 16x16, five of the teacher's nine at 8x8, 366,554 parameters. benchmarks/student_shape.py
chose it on a 2-core AMD EPYC with AVX-512 VNNI as the shape with the most parameters whose INT8 meets
5x / 10x with 10 % to spare (6.53x / 12.08x): ORT's INT8 runs the wide last stage cheaply. On the Xeon with
AMX it met 10x at batch 64 without that margin, and chose ``layer3=4`` (292,570 parameters, the previous
headline's student, 1.42 points below the teacher); ``--keep-blocks layer1=1,layer2=1,layer3=1`` is the one
before, ``--keep-blocks '' --separable --depth 0.23`` the first. Training uses crop/flip augmentation with a
bank of teacher logits for 16 fixed views per image (FKD; 16 against 8 views measured level on the 0/1/4
student, benchmarks/results/bank_views_v16_epyc.json) and the loss benchmarks/distill_ablation.py measured
best; INT8 comes from QAT (the ort-cpu profile's method).
``--time-budget MIN`` sizes the schedule to wall-clock minutes instead of ``--epochs``.

On a CUDA GPU, the long run is the same command with more epochs; the trainer checkpoints every 100
steps, so it can run in steps of at most 10 minutes, each continuing where the last stopped:

    while timeout 590 python benchmarks/reference.py --epochs 200 --out runs/reference-gpu; [ $? -eq 124 ]; do :; done

(never run: no GPU was lent to the sessions that wrote it; the loop stops on success or on any real error.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def keep_blocks(args: argparse.Namespace) -> dict[str, int]:
    from kdtoolkit.cli.options import parse_keep_blocks

    return parse_keep_blocks(args.keep_blocks) or {}


def compress_run(args: argparse.Namespace, out: Path, *, alpha: float) -> dict:
    from kdtoolkit.config import QatConfig
    from kdtoolkit.distill.schedules import Schedule
    from kdtoolkit.distill.trainer import LossConfig, TrainConfig
    from kdtoolkit.pipeline import CompressConfig, DataConfig, MeasureConfig, compress
    from kdtoolkit.student.build import StudentConfig

    cfg = CompressConfig(
        model=str(args.teacher), arch="cifar_resnet56",
        data=DataConfig(source=str(args.data), mean=MEAN, std=STD, train_limit=args.train_limit, test_limit=args.test_limit),
        profile=args.profile,
        student=StudentConfig(depth=args.depth, width=args.width, separable=args.separable, init="svd", keep_blocks=keep_blocks(args)),
        train=TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, augment=args.augment, seed=args.seed,
                          augment_views=args.augment_views if alpha > 0 else 0, time_budget_min=args.time_budget,
                          checkpoint_every=100,
                          loss=LossConfig(name=args.loss if alpha > 0 else "ce", alpha=Schedule(start=alpha), temperature=Schedule(start=4.0))),
        measure=MeasureConfig(batches=[1, 64], iters=20),
        qat=QatConfig(epochs=1, max_steps=args.qat_steps),
    )
    return compress(cfg, out, progress=not args.quiet)


class _Reader:
    """Calibration batches from the training split (what a user would hand quantize_static)."""

    def __init__(self, x: np.ndarray, name: str, batch: int = 32) -> None:
        self.chunks = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.chunks, None)


def ort_ptq(teacher_onnx: Path, out: Path, splits, n_calib: int = 512) -> Path:
    """onnxruntime.quantization.quantize_static with its usual settings: QDQ, per-channel, u8 activations, MinMax."""
    if out.exists():
        return out
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kdtoolkit.data.datasets import to_tensor

    rng = np.random.default_rng(0)
    idx = rng.choice(len(splits.train), min(n_calib, len(splits.train)), replace=False)
    x = to_tensor(splits.train.x[np.sort(idx)], splits.spec).numpy()
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(teacher_onnx), str(pre))
    tmp = out.with_suffix(".tmp.onnx")
    quantize_static(str(pre), str(tmp), _Reader(x, "input"), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    tmp.replace(out)
    pre.unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--teacher", type=Path, default=REPO.parent / "shared" / "data" / "weights" / "resnet56-cifar10-jpeg-ft.th")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "reference")
    ap.add_argument("--profile", default="ort-cpu")
    ap.add_argument("--epochs", type=int, default=200, help="the schedule's length (with --time-budget: its upper bound)")
    ap.add_argument("--time-budget", type=float, default=None, help="minutes of training per student (sizes the cosine schedule)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--depth", type=float, default=0.12, help="blocks kept per stage (0.12: 1 of 9, ResNet-8; 0.23: ResNet-14; 0.34: ResNet-20)")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--keep-blocks", default="layer1=0,layer2=1,layer3=5",
                    help="blocks kept per stage, over --depth ('' for --depth alone; layer3=4 and layer1=1,layer2=1,layer3=1 are older headlines)")
    ap.add_argument("--load-note", default="not stated", help="what else ran on the machine (recorded with the figures)")
    ap.add_argument("--separable", action=argparse.BooleanOptionalAction, default=False, help="depthwise-separable convs (the old student)")
    ap.add_argument("--augment", default="crop_flip", help="none keeps the plain teacher-logit cache")
    ap.add_argument("--augment-views", type=int, default=16, help="teacher-logit bank of this many augmented views per image (FKD)")
    ap.add_argument("--loss", default="kd", help="distillation loss of the kd row (kd, dkd, dist)")
    ap.add_argument("--qat-steps", type=int, default=600, help="QAT steps (batch 128) for the INT8 student")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--iters", type=int, default=60, help="interleaved timing rounds per batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jetson-profile", default="jetson-agx-orin", help="also build the off-device hand-off for this profile ('' to skip)")
    ap.add_argument("--row", choices=("kd", "alone"), default=None,
                    help="build only this row's compress run and stop (train the two rows side by side, one thread each; "
                         "then run again without --row to measure)")
    ap.add_argument("--results", default="reference",
                    help="file stem under benchmarks/results/ for the JSON, table and plot (another stem keeps the headline's files)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    for p in (args.data, args.teacher):
        if not p.exists():
            sys.exit(f"missing {p}: the shared data folder must sit beside the checkout")

    from kdtoolkit.backends.ort import OrtRunner, make_session
    from kdtoolkit.envinfo import environment
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.latency.timing import measure

    t0 = time.perf_counter()
    if args.row:
        compress_run(args, args.out / args.row, alpha=0.9 if args.row == "kd" else 0.0)
        print(f"{args.row}: {args.out / args.row} is built; run again without --row to measure every row")
        return
    kd = compress_run(args, args.out / "kd", alpha=0.9)
    alone = compress_run(args, args.out / "alone", alpha=0.0)
    from kdtoolkit.pipeline import Context, load_config

    ctx = Context(load_config(args.out / "kd" / "config.yaml"), args.out / "kd", progress=False)
    splits = ctx.splits
    teacher_onnx = Path(kd["stages"]["export-teacher"]) / "model.onnx"
    models = {
        "teacher": teacher_onnx,
        "ort_ptq": ort_ptq(teacher_onnx, args.out / "teacher_ort_ptq.onnx", splits),
        "student_alone": Path(alone["stages"]["optimize"]) / "model.onnx",
        "kdtoolkit": Path(kd["stages"]["optimize"]) / "model.onnx",
    }
    precision = {"teacher": "fp32", "ort_ptq": "int8", "student_alone": alone["student"].get("precision"),
                 "kdtoolkit": kd["student"].get("precision")}
    rows = []
    for name, path in models.items():
        acc = evaluate(make_session(path), splits.test, splits.spec)["accuracy"]
        rows.append({"name": name, "accuracy": acc, "precision": precision[name], "onnx": os.path.relpath(path, REPO), "size_bytes": path.stat().st_size})
    runners = [OrtRunner(p, name=n) for n, p in models.items()]
    lat = measure(runners, [1, 64], warmup=10, iters=args.iters)
    for r in rows:
        r["latency_ms"] = {"b1": lat[r["name"]][1]["p50"], "b64": lat[r["name"]][64]["p50"],
                           "b1_p90": lat[r["name"]][1]["p90"], "b64_p90": lat[r["name"]][64]["p90"]}
    t = {r["name"]: r for r in rows}
    k = t["kdtoolkit"]
    distill_metrics = {n: json.loads((Path(run["stages"]["distill"]) / "manifest.json").read_text())["metrics"]
                       for n, run in (("kd", kd), ("alone", alone))}
    fp32 = {n: m["accuracy"] for n, m in distill_metrics.items()}
    trend = {n: [{"epoch": h["epoch"], "val_accuracy": h["val_accuracy"], "step": h["step"]}
                 for h in json.loads((Path(run["stages"]["distill"]) / "history.json").read_text())]
             for n, run in (("kd", kd), ("alone", alone))}
    figures = {
        "speedup_b1": t["teacher"]["latency_ms"]["b1"] / k["latency_ms"]["b1"],
        "speedup_b64": t["teacher"]["latency_ms"]["b64"] / k["latency_ms"]["b64"],
        "accuracy_drop_points": 100 * (t["teacher"]["accuracy"] - k["accuracy"]),
        "kd_gain_points": 100 * (k["accuracy"] - t["student_alone"]["accuracy"]),
        "kd_gain_points_fp32": 100 * (fp32["kd"] - fp32["alone"]),
        "kdtoolkit_precision": kd["student"].get("precision"),
        "targets": {"speedup_b1": ">= 5", "speedup_b64": ">= 10", "accuracy_drop_points": "<= 1.0", "kd_gain_points": ">= 1.5"},
    }
    result = {
        "command": " ".join(["python", "benchmarks/reference.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": environment()["cpu"], "environment": {k2: v for k2, v in environment().items() if k2 != "cpu"},
        "budget": {"epochs": args.epochs, "time_budget_min": args.time_budget, "train_limit": args.train_limit, "test_limit": args.test_limit,
                   "depth": args.depth, "keep_blocks": keep_blocks(args), "width": args.width, "separable": args.separable, "augment": args.augment,
                   "augment_views": args.augment_views, "loss": args.loss, "qat_steps": args.qat_steps, "seed": args.seed,
                   "timing_rounds": args.iters,
                   "distill_train_time_s": {n: m["train_time_s"] for n, m in distill_metrics.items()},
                   "distill_steps": {n: m["steps"] for n, m in distill_metrics.items()}},
        "rows": rows, "figures": figures,
        "distill_fp32_test_accuracy": fp32,
        "trend": {"what": "validation top-1 (the held-out 10 % of the training split) after each epoch of the distill stage",
                  **trend},
        "jetson": jetson_handoff(args, args.out / "kd", args.out / "jetson") if args.jetson_profile else None,
        "wall_s": time.perf_counter() - t0,
        "load_note": args.load_note,
    }
    from kdtoolkit import fsutil

    RESULTS.mkdir(parents=True, exist_ok=True)
    fsutil.write_json(RESULTS / f"{args.results}.json", result)
    _plot(rows, trend, RESULTS / f"{args.results}.png")
    table = _table(rows)
    fsutil.write_text(RESULTS / f"{args.results}.md", table)
    print(table)
    print(json.dumps(figures, indent=2))


def _table(rows: list[dict]) -> str:
    """The README table: one line per row, speedups against the FP32 teacher."""
    base = next(r for r in rows if r["name"] == "teacher")["latency_ms"]
    lines = ["| row | precision | top-1 | p50 batch 1 (ms) | p50 batch 64 (ms) | speedup b1 / b64 | ONNX size |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"]
        lines.append(f"| {r['name']} | {r['precision']} | {100 * r['accuracy']:.2f} % | {lat['b1']:.3f} | {lat['b64']:.2f} | "
                     f"{base['b1'] / lat['b1']:.2f}x / {base['b64'] / lat['b64']:.2f}x | {r['size_bytes'] / 1e6:.2f} MB |")
    return "\n".join(lines) + "\n"


def jetson_handoff(args: argparse.Namespace, kd_dir: Path, out: Path) -> dict:
    """Item 2: the same run for a TensorRT profile, built off the device.

    The finished teacher/student/distill stages are copied from the ort-cpu run, so `compress` skips
    them by content hash (what a user gets by rerunning with another --profile into a copy of the run)
    and only export, QDQ quantization, the static check and the bundle are redone for the target."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for stage in ("00-teacher", "01-student", "02-distill"):
        if not (out / stage).exists() and (kd_dir / stage).exists():
            shutil.copytree(kd_dir / stage, out / stage)
    prev = args.profile
    args.profile = args.jetson_profile
    try:
        summary = compress_run(args, out, alpha=0.9)
    finally:
        args.profile = prev
    bundle = json.loads((out / "bundle" / "manifest.json").read_text())
    check = json.loads((out / "bundle" / "model" / "check.json").read_text()) if (out / "bundle" / "model" / "check.json").exists() else None
    return {
        "profile": args.jetson_profile, "bundle": os.path.relpath(out / "bundle", REPO),
        "qdq_onnx": bundle["model"]["qdq"], "precision": bundle["model"]["precision"],
        "check": None if check is None else {**check["counts"], "ok": check["ok"], "tensorrt_version": check["tensorrt_version"]},
        "proxy_accuracy": bundle["metrics"]["accuracy"], "proxy_latency_runtime": bundle["metrics"]["latency_ms"]["runtime"],
        "needs_device": bundle["on_device"]["needs_device"], "commands": bundle["on_device"]["commands"],
        "reused_stages": [s for s in ("teacher", "student", "distill") if s in summary.get("skipped", [])],
    }


def _plot(rows: list[dict], trend: dict, path: Path) -> None:
    """Accuracy against latency for every row (batch 1 and 64), and the students' accuracy against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[2]
    for name, pts in trend.items():
        ax.plot([p["epoch"] for p in pts], [100 * p["val_accuracy"] for p in pts], marker="o", label=f"student, {name}")
    teacher = next(r for r in rows if r["name"] == "teacher")
    ax.axhline(100 * teacher["accuracy"], color="gray", ls="--", label="teacher (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    for ax, b in zip(axes, ("b1", "b64")):
        for r in rows:
            ax.scatter(r["latency_ms"][b], 100 * r["accuracy"], s=60)
            ax.annotate(r["name"], (r["latency_ms"][b], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a short log range
        ax.set_xlabel(f"p50 latency, batch {b[1:]} (ms, log)")
        ax.set_ylabel("top-1 on the test split (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("accuracy against latency (ONNX Runtime CPU, interleaved)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
