"""Trainer overhead: steps/s of kdtoolkit's Trainer vs a minimal hand-written PyTorch KD loop.

    nice -n 5 .venv/bin/python benchmarks/trainer_overhead.py [--rounds 5] [--steps 40]

Same student (small_cnn width 0.5), same teacher (small_cnn width 1, run live every step in both:
no teacher cache), same data (MNIST from ../shared/data, seeded subset; the built-in mnist-mini
when absent), same optimiser (SGD Nesterov, cosine), same KD loss, batch 64. The two are
interleaved round by round in one process, so machine load hits both alike; the figure is the
median over rounds of trainer steps/s divided by loop steps/s (the Trainer's steps/s excludes its
per-epoch validation, which the plain loop does not do). Rounds are cached in WORK/rounds.json, so
an interrupted run resumes. Steps per CPU second of this process are recorded beside wall-clock
steps/s: on a shared machine they move far less with other jobs' load. Results: benchmarks/results/trainer_overhead.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def hand_loop(student, teacher, x_u8, y_all, spec, steps: int, bs: int, lr: float, seed: int) -> tuple[float, float]:
    """The minimal KD loop a user would write: returns (steps per wall second, steps per CPU second).

    Batches are made from the same uint8 arrays with the same ``to_tensor`` as the Trainer's, so both
    feed identical tensors (memory format included: that alone changes CPU conv speed)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from kdtoolkit.data.datasets import to_tensor

    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x_u8), generator=g)
    student.train()
    teacher.eval()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(steps):
        idx = np.sort(perm[i * bs:(i + 1) * bs].numpy())
        x, y = to_tensor(x_u8[idx], spec), y_all[idx]
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        kl = F.kl_div(F.log_softmax(s / 4, 1), F.log_softmax(t / 4, 1), reduction="batchmean", log_target=True)
        loss = 0.9 * 16 * kl + 0.1 * F.cross_entropy(s, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        sched.step()
        loss.item()
    return steps / (time.perf_counter() - t0), steps / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps per run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "trainer_overhead"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trainer_overhead.json"))
    a = ap.parse_args()

    import torch

    from kdtoolkit.data.datasets import load_data
    from kdtoolkit.distill.trainer import TrainConfig, Trainer
    from kdtoolkit.envinfo import environment
    from kdtoolkit.models.zoo import small_cnn

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = str(DATA / "mnist.npz") if (DATA / "mnist.npz").exists() else "mnist-mini"
    n_train = a.steps * a.batch_size
    splits = load_data(src, train_limit=int(n_train / 0.9) + 64, test_limit=200, val_fraction=0.1, seed=a.seed)
    splits.val = splits.val.subset(list(range(min(64, len(splits.val)))))
    splits.train = splits.train.subset(list(range(n_train)))
    y_all = torch.from_numpy(splits.train.y)
    torch.manual_seed(a.seed)
    teacher = small_cnn(10, 1, 1.0).eval()
    init = small_cnn(10, 1, 0.5).state_dict()
    cfg = TrainConfig(epochs=1, batch_size=a.batch_size, lr=0.05, seed=a.seed, cache_teacher=False, augment="none",
                      channels_last=False)  # the hand loop feeds NCHW: same memory format in both

    load0 = __import__("os").getloadavg()
    rounds_p = work / "rounds.json"
    rounds = json.loads(rounds_p.read_text()) if rounds_p.exists() else []
    for r in range(len(rounds), a.rounds):
        order = ("trainer", "loop") if r % 2 == 0 else ("loop", "trainer")
        rec = {}
        for which in order:
            s = small_cnn(10, 1, 0.5)
            s.load_state_dict(init)
            if which == "trainer":
                wd = work / f"run{r}"
                import shutil

                shutil.rmtree(wd, ignore_errors=True)
                res = Trainer(cfg, wd, progress=False).fit(s, splits, teacher=teacher)
                h = res["history"][0]
                rec["trainer_steps_per_s"] = h["steps_per_s"]
                rec["trainer_steps_per_cpu_s"] = (h["step"]) / h["epoch_cpu_s"]
                shutil.rmtree(wd, ignore_errors=True)
            else:
                rec["loop_steps_per_s"], rec["loop_steps_per_cpu_s"] = hand_loop(s, teacher, splits.train.x, y_all, splits.spec, a.steps, a.batch_size, 0.05, a.seed)
        rec["ratio"] = rec["trainer_steps_per_s"] / rec["loop_steps_per_s"]
        rec["cpu_ratio"] = rec["trainer_steps_per_cpu_s"] / rec["loop_steps_per_cpu_s"]
        rounds.append(rec)
        rounds_p.write_text(json.dumps(rounds, indent=2))
        print(f"round {r + 1}/{a.rounds}: trainer {rec['trainer_steps_per_s']:.2f} steps/s, loop {rec['loop_steps_per_s']:.2f} "
              f"steps/s, ratio {rec['ratio']:.3f} (per CPU second: {rec['cpu_ratio']:.3f})", flush=True)
    ratio = statistics.median(x["ratio"] for x in rounds)
    env = environment()
    out = {
        "benchmark": "trainer_overhead", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/trainer_overhead.py", *sys.argv[1:]]),
        "machine": {**{k: env.get(k) for k in ("cpu", "platform", "torch", "python", "torch_threads", "gpu")},
                    "nproc": __import__("os").cpu_count(), "load_avg_at_end": __import__("os").getloadavg()},
        "seeds": {"seed": a.seed}, "data": __import__("os").path.relpath(src, ROOT) if src != "mnist-mini" else src, "steps_per_run": a.steps, "batch_size": a.batch_size,
        "student": "small_cnn width 0.5", "teacher": "small_cnn width 1.0 (live forward in both)",
        "rounds": rounds, "median_ratio_trainer_over_loop": ratio,
        "median_trainer_steps_per_s": statistics.median(x["trainer_steps_per_s"] for x in rounds),
        "median_loop_steps_per_s": statistics.median(x["loop_steps_per_s"] for x in rounds),
        "median_cpu_ratio_trainer_over_loop": statistics.median(x["cpu_ratio"] for x in rounds),
        "load_avg_at_start": load0,
        "note": "ratio = wall-clock steps/s; cpu_ratio = steps per CPU second of this process (less sensitive to other jobs on a shared machine)",
        "target": "ratio >= 0.90", "met": ratio >= 0.90,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"median trainer/loop steps/s ratio: {ratio:.3f} (target >= 0.90) -> {a.out}")


if __name__ == "__main__":
    main()
