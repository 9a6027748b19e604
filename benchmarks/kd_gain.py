"""KD gain: the same student trained with KD from the fine-tuned ResNet-56 vs on labels alone, same budget.

    nice -n 5 .venv/bin/python benchmarks/kd_gain.py [--epochs 2] [--train-limit 10000] [--student-arch cifar_resnet20]

Both runs are `kdtoolkit distill` with the same student architecture and initialisation (seeded),
data subset, optimiser, schedule, augmentation and number of steps; "labels alone" is --alpha 0
(the teacher is not consulted). The literature's plain-KD gain on CIFAR is about +1 to +3 points
(with full training budgets). Each run checkpoints, so rerunning resumes. Results:
benchmarks/results/kd_gain.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--student-arch", default="cifar_resnet20")
    ap.add_argument("--student-width", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "kd_gain"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kd_gain.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    warmup = max(1, min(50, a.epochs * int(0.9 * a.train_limit) // a.batch_size // 20))  # 5 % of the steps, at most 50
    base = [sys.executable, "-m", "kdtoolkit", "distill", str(DATA / "weights" / "resnet56-cifar10-jpeg-ft.th"), "--arch", "cifar_resnet56",
            "--student-arch", a.student_arch, "--data", str(DATA / "cifar10-jpeg.tar.gz"), "--mean", MEAN, "--std", STD,
            "--epochs", str(a.epochs), "--train-limit", str(a.train_limit), "--lr", str(a.lr), "--batch-size", str(a.batch_size),
            "--augment", "crop_flip", "--warmup", str(warmup), "--seed", str(a.seed), "--checkpoint-every", "50", "-T", str(a.temperature)]
    if a.student_width:
        base += ["--student-width", str(a.student_width)]
    if a.test_limit:
        base += ["--test-limit", str(a.test_limit)]
    runs = {}
    for name, alpha in (("labels_only", 0.0), ("kd", a.alpha)):
        cmd = base + ["--alpha", str(alpha), "--out", str(work / name), "--json", str(work / f"{name}.json")]
        if not (work / f"{name}.json").exists():
            print("$", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        r = json.loads((work / f"{name}.json").read_text())
        runs[name] = {"alpha": alpha, "accuracy": r["accuracy"], "best_val_accuracy": r["best_val_accuracy"], "steps": r["steps"],
                      "train_time_s": r["train_time_s"], "teacher_accuracy": r.get("teacher_accuracy"),
                      "command": "kdtoolkit " + " ".join(c.replace(str(ROOT.parent), "..") for c in cmd[3:])}
    from kdtoolkit.envinfo import environment

    env = environment()
    gain = runs["kd"]["accuracy"] - runs["labels_only"]["accuracy"]
    out = {
        "benchmark": "kd_gain", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**{k: env.get(k) for k in ("cpu", "platform", "torch", "python", "torch_threads", "gpu")},
                    "nproc": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "seeds": {"seed": a.seed}, "student": a.student_arch, "epochs": a.epochs, "train_limit": a.train_limit,
        "runs": runs, "kd_gain_points": 100 * gain,
        "budget": f"{runs['kd']['steps']} optimiser steps per run ({a.train_limit} training images x {a.epochs} epoch(s))",
        "reference": "plain KD gains about +1 to +3 points over the student alone (CRD/DKD papers, full budgets)",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"labels only {100 * runs['labels_only']['accuracy']:.2f} %, KD {100 * runs['kd']['accuracy']:.2f} % "
          f"-> gain {100 * gain:+.2f} points -> {a.out}")


if __name__ == "__main__":
    main()
