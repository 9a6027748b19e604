"""How far more epochs take the headline's KD student (issue 9: "measure the trend").

    python benchmarks/reference_trend.py [--epochs 40]       # after benchmarks/reference.py

Distils the same student (the reference run's SVD-initialised `01-student` artifact) from the
same teacher with the same recipe as the reference run's KD student (SGD 0.05 cosine, batch 128,
no augmentation so the logit cache is on, alpha 0.9, T 4, seed 0), only for more epochs, with
`kdtoolkit distill`. Resumable: rerunning the same command resumes the distill run. Writes
benchmarks/results/reference_trend.json: test top-1 and the per-epoch validation curve at 20
epochs (from reference.json) and at N.
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
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--reference", type=Path, default=ROOT / "runs" / "reference")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "reference_e40")
    a = ap.parse_args()
    student = a.reference / "kd" / "01-student"
    ref_json = RESULTS / "reference.json"
    if not student.is_dir() or not ref_json.exists():
        sys.exit(f"run benchmarks/reference.py first (needs {student} and {ref_json})")
    ref = json.loads(ref_json.read_text())

    def rel(p: Path) -> str:  # the command as typed from the repo root
        return os.path.relpath(p, ROOT)

    cmd = ["kdtoolkit", "distill", rel(DATA / "weights" / "resnet56-cifar10-jpeg-ft.th"), rel(student), "--arch", "cifar_resnet56",
           "--data", rel(DATA / "cifar10-jpeg.tar.gz"), "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
           "--epochs", str(a.epochs), "--batch-size", "128", "--lr", "0.05", "--warmup", "0", "--augment", "none", "--seed", "0",
           "--alpha", "0.9", "-T", "4", "--checkpoint-every", "100", "--out", rel(a.work / "kd"), "--json", rel(a.work / "kd.json"), "-q"]
    if not (a.work / "kd.json").exists():
        print("$", " ".join(cmd), flush=True)
        subprocess.run([sys.executable, "-m", "kdtoolkit", *cmd[1:]], check=True, cwd=ROOT)
    r = json.loads((a.work / "kd.json").read_text())
    history = json.loads((a.work / "kd" / "history.json").read_text()) if (a.work / "kd" / "history.json").exists() else []
    from kdtoolkit.envinfo import environment

    teacher = next(x for x in ref["rows"] if x["name"] == "teacher")["accuracy"]
    out = {
        "benchmark": "reference_trend", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(cmd), "machine": environment()["cpu"], "load_avg_at_end": os.getloadavg(),
        "teacher_test_accuracy": teacher,
        "runs": {
            "20": {"test_accuracy_fp32": ref["distill_fp32_test_accuracy"]["kd"], "trend": ref["trend"]["kd"],
                   "train_time_s": ref["budget"].get("distill_train_time_s", {}).get("kd")},
            str(a.epochs): {"test_accuracy_fp32": r["accuracy"], "best_val_accuracy": r.get("best_val_accuracy"),
                            "steps": r.get("steps"), "train_time_s": r.get("train_time_s"),
                            "trend": [{"epoch": h["epoch"], "val_accuracy": h["val_accuracy"], "step": h["step"]} for h in history]},
        },
    }
    out["gap_points"] = {k: 100 * (teacher - v["test_accuracy_fp32"]) for k, v in out["runs"].items()}
    from kdtoolkit import fsutil

    fsutil.write_json(RESULTS / "reference_trend.json", out)
    print(json.dumps({k: {"test_top1": v["test_accuracy_fp32"], "gap_points": out["gap_points"][k]} for k, v in out["runs"].items()}, indent=2))


if __name__ == "__main__":
    main()
