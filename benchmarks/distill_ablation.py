"""What each training lever is worth for the headline student, at one fixed budget (issue 14, part 2).

    nice -n 5 .venv/bin/python benchmarks/distill_ablation.py [--epochs 6] [--rows a b ...]

Every row distils a student of the shared fine-tuned ResNet-56 (89.94 %) on the CIFAR-10 JPEG training
split (45,000 images; 5,000 held out for validation) for the same number of epochs, seed 0, SGD lr 0.05
cosine, batch 128, and reports top-1 of the FP32 student on all 10,000 test images. One lever changes
per row against the row before it:
  sep-kd         the old headline recipe: separable student (depth 0.23), Hinton KD, no augmentation
  std-kd         the shape benchmarks/student_shape.py picked for INT8 (standard convs, depth 0.12)
  std-kd-bank    + crop/flip augmentation with a bank of 8 teacher views per image (FKD)
  std-dkd-bank   DKD (Zhao 2022) in place of Hinton KD
  std-dist-bank  DIST (Huang 2022) in place of Hinton KD
  std-ce-bank    labels alone (no teacher): what distillation adds
  late-kd-bank   std-kd-bank with the late-heavy student (0/1/4 blocks per stage, --keep-blocks): 3.9x the
                 parameters, faster in INT8 at batch 64 (benchmarks/results/student_shape.json)
  late-kd        late-kd-bank without augmentation or bank (plain teacher-logit cache): what the bank is
                 worth over a long schedule, run as
                 ``--epochs 60 --rows late-kd --out benchmarks/results/distill_ablation_e60.json`` beside
                 the 60-epoch headline's KD row (benchmarks/results/reference.json), which is late-kd-bank
                 trained by ``compress`` with the same trainer settings
Resumable: each row trains in its own folder under --work (the trainer resumes from its checkpoint) and
caches its result; the teacher's logits and the view bank are computed once and linked into every row.
Results go to benchmarks/results/distill_ablation.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import MEAN, STD, shared_teacher_data  # noqa: E402  (benchmarks/ is on the path when a script runs)

BANK = "teacher_views_crop_flip_8_s0.npy"

SEP = {"depth": 0.23}
STD_SHAPE = {"depth": 0.12, "separable": False}
ROWS: dict[str, dict[str, Any]] = {
    "sep-kd": {"student": SEP, "loss": "kd", "augment": "none"},
    "std-kd": {"student": STD_SHAPE, "loss": "kd", "augment": "none"},
    "std-kd-bank": {"student": STD_SHAPE, "loss": "kd", "augment": "crop_flip", "views": 8},
    "std-dkd-bank": {"student": STD_SHAPE, "loss": "dkd", "augment": "crop_flip", "views": 8},
    "std-dist-bank": {"student": STD_SHAPE, "loss": "dist", "augment": "crop_flip", "views": 8},
    "std-ce-bank": {"student": STD_SHAPE, "loss": "ce", "augment": "crop_flip"},
    "late-kd-bank": {"student": {"keep_blocks": {"layer1": 0, "layer2": 1, "layer3": 4}, "separable": False}, "loss": "kd",
                     "augment": "crop_flip", "views": 8},
    "late-kd": {"student": {"keep_blocks": {"layer1": 0, "layer2": 1, "layer3": 4}, "separable": False}, "loss": "kd",
                "augment": "none"},
}


def link_shared(shared: Path, run_dir: Path, name: str) -> None:
    """Teacher outputs are the same for every row: link the first row's file into the others (and back)."""
    src, mine = shared / name, run_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    for a, b in ((src, mine), (mine, src)):
        if a.exists() and not b.exists():
            try:
                os.link(a, b)
            except OSError:
                shutil.copyfile(a, b)
        side_a, side_b = a.with_suffix(".json"), b.with_suffix(".json")
        if side_a.exists() and not side_b.exists():
            shutil.copyfile(side_a, side_b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "distill_ablation"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--rows", nargs="*", default=None, help=f"rows to run (default: all of {', '.join(ROWS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill_ablation.json"))
    ap.add_argument("--load-note", default="not stated", help="what else ran on the machine (recorded with the figures)")
    a = ap.parse_args()

    import torch

    from kdtoolkit import fsutil
    from kdtoolkit.config import LossConfig, StudentConfig, TrainConfig
    from kdtoolkit.data import batches, load_data
    from kdtoolkit.distill.trainer import Trainer
    from kdtoolkit.envinfo import environment
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.student.build import count_params, make_student

    t0 = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tar, weights = shared_teacher_data()
    splits = load_data(str(tar), mean=MEAN, std=STD, seed=a.seed)
    teacher = load_model(str(weights), arch="cifar_resnet56")
    teacher.module.eval()
    out_path = Path(a.out)
    doc: dict[str, Any] = json.loads(out_path.read_text()) if out_path.exists() else {}
    results: dict[str, Any] = doc.get("rows", {})
    for name, row in ROWS.items():
        if a.rows and name not in a.rows:
            continue
        d = work / name
        key = f"{json.dumps(row, sort_keys=True)}-e{a.epochs}-s{a.seed}"
        done = d / "result.json"
        if done.exists() and json.loads(done.read_text()).get("_key") == key:
            results[name] = {k: v for k, v in json.loads(done.read_text()).items() if k != "_key"}
            print(f"[ablation] {name}: cached ({100 * results[name]['test_top1']:.2f} %)", flush=True)
            continue
        print(f"[ablation] {name} ...", flush=True)
        link_shared(work, d / "train", "teacher_logits.npy")
        link_shared(work, d / "train", BANK)
        torch.manual_seed(a.seed)
        calib = batches(splits.train, splits.spec, 64, shuffle=True, seed=a.seed)
        s, _, _ = make_student(teacher, StudentConfig(init="svd", **row["student"]), input_shape=(1, 3, 32, 32), num_classes=10,
                               calib_batches=calib)
        cfg = TrainConfig(epochs=a.epochs, batch_size=128, lr=0.05, augment=row["augment"], augment_views=row.get("views", 0),
                          seed=a.seed, checkpoint_every=100, loss=LossConfig(name=row["loss"]))
        res = Trainer(cfg, d / "train", progress=True).fit(s.train(), splits, teacher=None if row["loss"] == "ce" else teacher.module)
        link_shared(work, d / "train", "teacher_logits.npy")
        link_shared(work, d / "train", BANK)
        model = res["model"].eval()
        test = evaluate(model, splits.test, splits.spec)["accuracy"]
        bank_info = d / "train" / BANK.replace(".npy", ".json")
        r = {**row, "params": count_params(model), "test_top1": test, "steps": res["steps"],
             "train_time_s": round(res["train_time_s"], 1), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "val_trend": [{"epoch": h.get("epoch"), "val_accuracy": h.get("val_accuracy")} for h in res["history"]],
             "view_bank": json.loads(bank_info.read_text()) if row.get("views") and bank_info.exists() else None}
        fsutil.write_json(done, {**r, "_key": key})
        results[name] = r
        print(f"[ablation] {name}: {100 * test:.2f} % ({r['train_time_s']:.0f} s)", flush=True)

    env = environment()
    doc = {
        "benchmark": "distill_ablation",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": {"cpu": env.get("cpu"), "platform": platform.platform(), "torch": env.get("torch"),
                    "torch_threads": env.get("torch_threads"), "load_avg_at_end": list(os.getloadavg()),
                    "note": a.load_note},
        "setup": {"teacher": "cifar_resnet56 fine-tuned on CIFAR-10 JPEG (shared), 89.94 % test top-1",
                  "budget": f"{a.epochs} epochs of 45,000 images, batch 128, SGD lr 0.05 cosine, seed {a.seed}, SVD/teacher init",
                  "test": f"FP32 top-1 on all {len(splits.test)} test images"},
        "rows": results, "wall_s": round(time.perf_counter() - t0, 1),
    }
    fsutil.write_json(out_path, doc)
    print(f"\n{'row':16s} {'params':>8s} {'top-1':>7s} {'train s':>8s}")
    for n, r in results.items():
        print(f"{n:16s} {r['params']:8,d} {100 * r['test_top1']:6.2f}% {r['train_time_s']:8.0f}")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
