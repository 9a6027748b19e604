"""The headline: kdtoolkit against what users do today, measured in one run (issue 9).

Rows, all measured with ONNX Runtime in the same process, interleaved, at batch 1 and 64, with
top-1 on the test split:
  teacher        the fine-tuned ResNet-56 in FP32
  ort_ptq        the teacher quantized with onnxruntime's quantize_static (QDQ, per-channel, u8, MinMax)
  student_alone  the same student as kdtoolkit's, trained on labels alone with the same budget
  kdtoolkit      `compress` output: student + KD + the precision `auto` chose

Resumable: each training run is a `compress` run folder (finished stages are skipped, training
resumes from its checkpoint); the final measurement is cheap and is always redone.

    python benchmarks/reference.py --data ../shared/data/cifar10-jpeg.tar.gz --epochs 8 --out runs/reference
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def compress_run(args: argparse.Namespace, out: Path, *, alpha: float) -> dict:
    from kdtoolkit.distill.schedules import Schedule
    from kdtoolkit.distill.trainer import LossConfig, TrainConfig
    from kdtoolkit.pipeline import CompressConfig, DataConfig, MeasureConfig, compress
    from kdtoolkit.student.build import StudentConfig

    cfg = CompressConfig(
        model=str(args.teacher), arch="cifar_resnet56",
        data=DataConfig(source=str(args.data), mean=MEAN, std=STD, train_limit=args.train_limit, test_limit=args.test_limit),
        profile=args.profile,
        student=StudentConfig(depth=args.depth, width=args.width, init="svd"),
        train=TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, augment=args.augment, seed=args.seed,
                          checkpoint_every=100, loss=LossConfig(alpha=Schedule(start=alpha), temperature=Schedule(start=4.0))),
        measure=MeasureConfig(batches=[1, 64], iters=20),
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
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
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
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--depth", type=float, default=0.34, help="blocks kept per stage (0.34: ResNet-56 -> ResNet-20 depth)")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--augment", default="none", help="none keeps the teacher-logit cache on (much faster on CPU)")
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--iters", type=int, default=60, help="interleaved timing rounds per batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    for p in (args.data, args.teacher):
        if not p.exists():
            sys.exit(f"missing {p}: the shared data folder must sit beside the checkout")

    from kdtoolkit.envinfo import environment
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.engine.ort import make_session
    from kdtoolkit.profile.runners import OrtRunner, measure

    t0 = time.perf_counter()
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
    rows = []
    for name, path in models.items():
        acc = evaluate(make_session(path), splits.test, splits.spec)["accuracy"]
        rows.append({"name": name, "accuracy": acc, "onnx": str(path), "size_bytes": path.stat().st_size})
    runners = [OrtRunner(p, name=n) for n, p in models.items()]
    lat = measure(runners, [1, 64], warmup=10, iters=args.iters)
    for r in rows:
        r["latency_ms"] = {"b1": lat[r["name"]][1]["p50"], "b64": lat[r["name"]][64]["p50"],
                           "b1_p90": lat[r["name"]][1]["p90"], "b64_p90": lat[r["name"]][64]["p90"]}
    t = {r["name"]: r for r in rows}
    k = t["kdtoolkit"]
    figures = {
        "speedup_b1": t["teacher"]["latency_ms"]["b1"] / k["latency_ms"]["b1"],
        "speedup_b64": t["teacher"]["latency_ms"]["b64"] / k["latency_ms"]["b64"],
        "accuracy_drop_points": 100 * (t["teacher"]["accuracy"] - k["accuracy"]),
        "kd_gain_points": 100 * (k["accuracy"] - t["student_alone"]["accuracy"]),
        "kdtoolkit_precision": kd["student"].get("precision"),
        "targets": {"speedup_b1": ">= 5", "speedup_b64": ">= 10", "accuracy_drop_points": "<= 1.0", "kd_gain_points": ">= 1.5"},
    }
    result = {
        "command": " ".join(["python", "benchmarks/reference.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": environment()["cpu"], "environment": {k2: v for k2, v in environment().items() if k2 != "cpu"},
        "budget": {"epochs": args.epochs, "train_limit": args.train_limit, "test_limit": args.test_limit, "depth": args.depth,
                   "width": args.width, "augment": args.augment, "seed": args.seed, "timing_rounds": args.iters},
        "rows": rows, "figures": figures, "wall_s": time.perf_counter() - t0,
    }
    from kdtoolkit import fsutil

    RESULTS.mkdir(parents=True, exist_ok=True)
    fsutil.write_json(RESULTS / "reference.json", result)
    _plot(rows, RESULTS / "reference.png")
    print("| row | top-1 | p50 b1 (ms) | p50 b64 (ms) | size |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {100 * r['accuracy']:.2f} % | {r['latency_ms']['b1']:.3f} | {r['latency_ms']['b64']:.2f} | {r['size_bytes'] / 1e6:.2f} MB |")
    print(json.dumps(figures, indent=2))


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, b in zip(axes, ("b1", "b64")):
        for r in rows:
            ax.scatter(r["latency_ms"][b], 100 * r["accuracy"], s=60)
            ax.annotate(r["name"], (r["latency_ms"][b], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xscale("log")
        ax.set_xlabel(f"p50 latency, batch {b[1:]} (ms, log)")
        ax.set_ylabel("top-1 on the test split (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("accuracy against latency (ONNX Runtime CPU, interleaved)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
