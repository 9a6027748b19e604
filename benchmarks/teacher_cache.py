"""Teacher-output cache: epoch time with the cache vs running the teacher every step.

    nice -n 5 .venv/bin/python benchmarks/teacher_cache.py [--train-limit 1536] [--rounds 3]

The fine-tuned ResNet-56 from ../shared/data teaches a separable ResNet-20 (kdtoolkit's own
student conversion of the pretrained ResNet-20, SVD-initialised) on a seeded subset of the CIFAR-10
JPEG training split, batch 64, no augmentation (the cache's condition). Each round trains one
epoch with the cache and one without, interleaved in one process (order alternating), from the
same initial weights; epoch time is the Trainer's own training time (validation excluded). The
one-time cost of filling the cache (one teacher pass over the subset) is reported apart. Rounds
are cached in WORK/rounds.json, so an interrupted run resumes. Results:
benchmarks/results/teacher_cache.json.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--train-limit", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "teacher_cache"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "teacher_cache.json"))
    a = ap.parse_args()

    import copy

    from kdtoolkit.distill.trainer import TeacherCache, TrainConfig, Trainer
    from kdtoolkit.envinfo import environment

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    splits, teacher, student, init = r56_teaches_separable_r20(a.train_limit, a.seed)

    cache_file = work / "cache_build" / "teacher_logits.npy"
    build_s_p = work / "cache_build_s.json"
    if not build_s_p.exists():
        shutil.rmtree(cache_file.parent, ignore_errors=True)
        t0 = time.perf_counter()
        TeacherCache(teacher, splits.train, splits.spec, cache_file)
        build_s_p.write_text(json.dumps({"cache_build_s": time.perf_counter() - t0}))
    cache_build_s = json.loads(build_s_p.read_text())["cache_build_s"]

    rounds_p = work / "rounds.json"
    rounds = json.loads(rounds_p.read_text()) if rounds_p.exists() else []
    for r in range(len(rounds), a.rounds):
        rec = {}
        for cached in ((True, False) if r % 2 == 0 else (False, True)):
            s = copy.deepcopy(student)
            s.load_state_dict(init)
            wd = work / f"run{r}-{'cache' if cached else 'live'}"
            shutil.rmtree(wd, ignore_errors=True)
            wd.mkdir(parents=True)
            if cached:
                shutil.copyfile(cache_file, wd / "teacher_logits.npy")  # built once above, timed apart
            cfg = TrainConfig(epochs=1, batch_size=a.batch_size, lr=0.02, seed=a.seed, cache_teacher=cached, augment="none")
            res = Trainer(cfg, wd, progress=False).fit(s, splits, teacher=teacher)
            rec["cache_epoch_s" if cached else "live_epoch_s"] = res["history"][0]["epoch_time_s"]
            shutil.rmtree(wd, ignore_errors=True)
        rec["speedup"] = rec["live_epoch_s"] / rec["cache_epoch_s"]
        rounds.append(rec)
        rounds_p.write_text(json.dumps(rounds, indent=2))
        print(f"round {r + 1}/{a.rounds}: epoch {rec['live_epoch_s']:.1f} s live teacher, {rec['cache_epoch_s']:.1f} s cached "
              f"-> {rec['speedup']:.2f}x", flush=True)
    speedup = statistics.median(x["speedup"] for x in rounds)
    env = environment()
    out = {
        "benchmark": "teacher_cache", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/teacher_cache.py", *sys.argv[1:]]),
        "machine": {**{k: env.get(k) for k in ("cpu", "platform", "torch", "python", "torch_threads", "gpu")},
                    "nproc": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
                    "note": "shared 2-core machine, other engineers' jobs running"},
        "seeds": {"seed": a.seed}, "data": "cifar10-jpeg.tar.gz train subset", "train_samples": len(splits.train),
        "batch_size": a.batch_size, "teacher": "resnet56-cifar10-jpeg-ft.th (cifar_resnet56)",
        "student": "separable ResNet-20 (make_student of resnet20-cifar10.th, SVD init)",
        "cache_build_s": cache_build_s, "rounds": rounds, "median_speedup": speedup,
        "median_live_epoch_s": statistics.median(x["live_epoch_s"] for x in rounds),
        "median_cache_epoch_s": statistics.median(x["cache_epoch_s"] for x in rounds),
        "target": "speedup >= 1.5", "met": speedup >= 1.5,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"median epoch speedup with the cache: {speedup:.2f}x (target >= 1.5) -> {a.out}")


if __name__ == "__main__":
    main()
