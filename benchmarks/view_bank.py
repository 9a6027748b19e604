"""Teacher view bank (FKD): augmented epochs with stored teacher views vs the live teacher.

    .venv/bin/python benchmarks/view_bank.py [--train-limit 2048] [--views 8] [--rounds 3]

The fine-tuned ResNet-56 from ../shared/data teaches a separable ResNet-20 (kdtoolkit's conversion of
the pretrained ResNet-20, SVD-initialised) on a seeded subset of the CIFAR-10 JPEG training split with
crop+flip augmentation, batch 64. Each round trains one epoch with the live teacher and one with the
view bank (``augment_views``), interleaved in one process (order alternating), from the same initial
weights; epoch time is the Trainer's own (validation excluded). The one-time cost of filling the bank
(the teacher over views x images, ONNX Runtime) is reported apart. Rounds are kept in WORK/rounds.json,
so an interrupted run resumes. Results: benchmarks/results/view_bank.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import r56_teaches_separable_r20  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-limit", type=int, default=2048)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "view_bank"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "view_bank.json"))
    a = ap.parse_args()


    from kdtoolkit.config import TrainConfig
    from kdtoolkit.distill.trainer import Trainer, ViewBank
    from kdtoolkit.envinfo import environment

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    splits, teacher, student, init = r56_teaches_separable_r20(a.train_limit, a.seed)

    name = f"teacher_views_crop_flip_{a.views}_s{a.seed}.npy"
    bank_file = work / "bank_build" / name
    build_p = work / "bank_build_s.json"
    if not build_p.exists():
        shutil.rmtree(bank_file.parent, ignore_errors=True)
        t0 = time.perf_counter()
        ViewBank(teacher, splits.train, splits.spec, bank_file, views=a.views, mode="crop_flip", seed=a.seed)
        build_p.write_text(json.dumps({"bank_build_s": time.perf_counter() - t0}))
    bank_build_s = json.loads(build_p.read_text())["bank_build_s"]

    rounds_p = work / "rounds.json"
    rounds = json.loads(rounds_p.read_text()) if rounds_p.exists() else []
    for r in range(len(rounds), a.rounds):
        rec = {}
        for banked in ((True, False) if r % 2 == 0 else (False, True)):
            s = copy.deepcopy(student)
            s.load_state_dict(init)
            wd = work / f"run{r}-{'bank' if banked else 'live'}"
            shutil.rmtree(wd, ignore_errors=True)
            wd.mkdir(parents=True)
            if banked:
                shutil.copyfile(bank_file, wd / name)  # built once above, timed apart
            cfg = TrainConfig(epochs=1, batch_size=a.batch_size, lr=0.02, seed=a.seed, augment="crop_flip",
                              augment_views=a.views if banked else 0)
            res = Trainer(cfg, wd, progress=False).fit(s, splits, teacher=teacher)
            rec["bank_epoch_s" if banked else "live_epoch_s"] = res["history"][0]["epoch_time_s"]
            shutil.rmtree(wd, ignore_errors=True)
        rec["speedup"] = rec["live_epoch_s"] / rec["bank_epoch_s"]
        rounds.append(rec)
        rounds_p.write_text(json.dumps(rounds, indent=2))
        print(f"round {r + 1}/{a.rounds}: augmented epoch {rec['live_epoch_s']:.1f} s live teacher, {rec['bank_epoch_s']:.1f} s "
              f"view bank -> {rec['speedup']:.2f}x", flush=True)
    speedup = statistics.median(x["speedup"] for x in rounds)
    env = environment()
    live = statistics.median(x["live_epoch_s"] for x in rounds)
    bank = statistics.median(x["bank_epoch_s"] for x in rounds)
    out = {
        "benchmark": "view_bank", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/view_bank.py", *sys.argv[1:]]),
        "machine": {**{k: env.get(k) for k in ("cpu", "platform", "torch", "python", "torch_threads", "gpu")},
                    "nproc": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
                    "note": "shared 2-core machine, other jobs of ours running"},
        "seeds": {"seed": a.seed}, "data": "cifar10-jpeg.tar.gz train subset, crop_flip", "train_samples": len(splits.train),
        "batch_size": a.batch_size, "views": a.views, "teacher": "resnet56-cifar10-jpeg-ft.th (cifar_resnet56)",
        "student": "separable ResNet-20 (make_student of resnet20-cifar10.th, SVD init)",
        "bank_build_s": bank_build_s, "rounds": rounds, "median_speedup": speedup,
        "median_live_epoch_s": live, "median_bank_epoch_s": bank,
        "break_even_epochs": bank_build_s / max(live - bank, 1e-9),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"median augmented-epoch speedup with the view bank: {speedup:.2f}x; bank built in {bank_build_s:.0f} s "
          f"({a.views} views) -> {a.out}")


if __name__ == "__main__":
    main()
