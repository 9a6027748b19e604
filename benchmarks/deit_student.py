"""A CNN teacher into a ViT student with DeiT's distillation token, against the same ViT on labels alone (issue 17).

    python benchmarks/deit_student.py [--minutes 8] [--width 0.5]

Teacher: the shared fine-tuned ResNet-56 (89.94 % on the JPEG test images). Student: the zoo's ``cifar_deit``
(``cifar_vit`` with a distillation token and head; patch 4, 6 blocks, 3 heads, embedding 192 x ``--width``),
from timm's own initialisation, the same seed for both rows. Both rows train for the same wall-time budget
(``TrainConfig.time_budget_min``) with AdamW, crop+flip and label smoothing 0.1 on all 50,000 training images
less a seeded 1,000-image validation split:

- ``deit_hard``: DeiT hard distillation (class head on the labels, distillation head on the teacher's argmax),
  the teacher run live on every augmented batch;
- ``labels``: loss ``ce`` (no teacher), both heads on the labels.

Top-1 on all 10,000 test images (the two heads averaged, as exported). Each row's checkpoint is under
runs/deit_student/<row>/ (every 50 steps: a killed run resumes); its result is cached as result.json.
Results: benchmarks/results/deit_student.json with the machine's CPU flags, command and seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import MEAN, STD, shared_teacher_data  # noqa: E402  (benchmarks/ is on the path when a script runs)

WORK = ROOT / "runs" / "deit_student"
OUT = ROOT / "benchmarks" / "results" / "deit_student.json"
SEED = 0


def row(name: str, minutes: float, width: float, splits: Any, teacher: Any) -> dict[str, Any]:
    import torch

    from kdtoolkit import fsutil
    from kdtoolkit.config import LossConfig, TrainConfig
    from kdtoolkit.distill.trainer import Trainer
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.models.loading import build_arch

    res_path = WORK / name / "result.json"
    if res_path.exists():
        return json.loads(res_path.read_text())
    torch.manual_seed(SEED)
    student = build_arch("cifar_deit", num_classes=10, in_channels=3, width=width)
    loss = LossConfig(name="kd", distill_token="hard", label_smoothing=0.1) if name == "deit_hard" else \
        LossConfig(name="ce", label_smoothing=0.1)
    cfg = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05, batch_size=128, warmup_steps=100, grad_clip=1.0,
                      augment="crop_flip", channels_last=False, checkpoint_every=50, seed=SEED, epochs=100,
                      time_budget_min=minutes, loss=loss)
    r = Trainer(cfg, WORK / name / "train").fit(student, splits, teacher=teacher if name == "deit_hard" else None)
    acc = evaluate(r["model"], splits.test, splits.spec)["accuracy"]
    res = {"row": name, "test_accuracy": acc, "steps": r["steps"], "epochs": len(r["history"]), "train_time_s": r["train_time_s"],
           "train_cpu_s": round(sum(h["epoch_cpu_s"] for h in r["history"]), 1), "best_val": r["best"],
           "params": sum(p.numel() for p in r["model"].parameters()), "budget_min": minutes,
           "train_config": cfg.model_dump(mode="json")}
    fsutil.write_json(res_path, res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0, help="each row's wall-time training budget")
    ap.add_argument("--width", type=float, default=0.5, help="cifar_deit embedding width multiplier")
    a = ap.parse_args()
    tar, weights = shared_teacher_data()
    from kdtoolkit import fsutil
    from kdtoolkit.data import load_data
    from kdtoolkit.envinfo import environment
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.models.loading import load_model

    t0 = time.perf_counter()
    splits = load_data(str(tar), mean=MEAN, std=STD, val_fraction=0.02, seed=SEED)
    teacher = load_model(weights, arch="cifar_resnet56").module.eval()
    rows = [row(n, a.minutes, a.width, splits, teacher) for n in ("deit_hard", "labels")]
    t_acc = evaluate(teacher, splits.test, splits.spec)["accuracy"]
    doc = {
        "benchmark": "deit_student", "what": (__doc__ or "").strip().splitlines()[0],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/deit_student.py", *sys.argv[1:]]), "seed": SEED,
        "machine": environment().get("cpu"), "teacher": {"arch": "cifar_resnet56 (fine-tuned on the JPEG domain)", "test_accuracy": t_acc},
        "student": {"arch": "cifar_deit", "width": a.width}, "rows": rows,
        "distillation_gain_points": round(100 * (rows[0]["test_accuracy"] - rows[1]["test_accuracy"]), 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    fsutil.write_json(OUT, doc)
    for r in rows:
        print(f"{r['row']:10s} {100 * r['test_accuracy']:6.2f} %  {r['steps']} steps  {r['train_time_s'] / 60:.1f} min")
    print(f"teacher {100 * t_acc:.2f} %; wrote {OUT}")


if __name__ == "__main__":
    main()
