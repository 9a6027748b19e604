"""Channels-last vs NCHW training speed of the Trainer on a separable student (why it is the default).

    .venv/bin/python benchmarks/channels_last.py [--rounds 5] [--steps 30]

The fine-tuned ResNet-56 teaches its separable ResNet-20-depth student (SVD init) on random
CIFAR-shaped batches of 128 (speed does not depend on the pixels), teacher logits precomputed,
so the figure is the student's forward + backward + optimiser step. The two memory formats
alternate round by round in one process; the figure is the median ratio of steps/s.
Results: benchmarks/results/channels_last.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEACHER = ROOT.parent / "shared" / "data" / "weights" / "resnet56-cifar10-jpeg-ft.th"


def steps_per_s(model, x, y, t_logits, channels_last: bool, steps: int) -> float:
    """KD steps/s of ``model`` in one memory format (2 warm-up steps not counted)."""
    import torch

    from kdtoolkit.distill.losses import kd_loss

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = kd_loss(model(x), t_logits, y, alpha=0.9, temperature=4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "channels_last.json"))
    a = ap.parse_args()
    if not TEACHER.exists():
        sys.exit(f"missing {TEACHER}: the shared data folder must sit beside the checkout")
    import copy

    import torch

    from kdtoolkit.envinfo import environment
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.student.build import StudentConfig, make_student

    torch.manual_seed(0)
    teacher = load_model(str(TEACHER), arch="cifar_resnet56")
    student = make_student(teacher, StudentConfig(depth=0.34, init="svd"), input_shape=(1, 3, 32, 32), num_classes=10)[0]
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    with torch.no_grad():
        t_logits = teacher.module.eval()(x)
    rounds = []
    for r in range(a.rounds):
        rec = {}
        for cl in ((True, False) if r % 2 == 0 else (False, True)):
            rec["channels_last" if cl else "nchw"] = steps_per_s(copy.deepcopy(student), x, y, t_logits, cl, a.steps)
        rec["ratio"] = rec["channels_last"] / rec["nchw"]
        rounds.append(rec)
        print(f"round {r + 1}/{a.rounds}: channels-last {rec['channels_last']:.2f} steps/s, NCHW {rec['nchw']:.2f} steps/s, "
              f"ratio {rec['ratio']:.2f}", flush=True)
    env = environment()
    out = {
        "benchmark": "channels_last", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/channels_last.py", *sys.argv[1:]]),
        "machine": {**{k: env.get(k) for k in ("cpu", "platform", "torch", "python", "torch_threads", "gpu")},
                    "nproc": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "model": "separable ResNet-20-depth student of ResNet-56 (37,770 params), batch 128, SGD, KD loss",
        "rounds": rounds, "median_ratio_channels_last_over_nchw": statistics.median(r["ratio"] for r in rounds),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"median channels-last / NCHW steps/s: {out['median_ratio_channels_last_over_nchw']:.2f} -> {a.out}")


if __name__ == "__main__":
    main()
