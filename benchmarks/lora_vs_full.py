"""LoRA against full fine-tuning of the ORIGINAL shared ResNet-56 on the CIFAR-10 JPEG domain, one epoch each.

    nice -n 19 .venv/bin/python benchmarks/lora_vs_full.py [--epochs 1] [--rank 8] [--train-limit N] [--test-limit N]

Both rows are the real `kdtoolkit finetune` command with the setup of benchmarks/finetune_r56.py (which took
the full fine-tune to 89.54 % in 3 epochs): SGD Nesterov, batch 128, crop+flip, 5 % warm-up, cosine, seed 0,
ImageNet normalisation, all 50,000 training images (10 % carved out for validation) and top-1 on the 10,000
test images. The LoRA row trains peft LoRA adapters on every conv (the head and the BatchNorm layers trained
alongside, peft modules_to_save); its learning rate is its own flag (adapters start at zero and usually want
a larger one; not tuned here). Figures per row: top-1 before/after, trainable parameters, the file a user ships
(adapter_model.safetensors for LoRA, model.pt for full), training time per epoch (wall and CPU seconds, from the
trainer's history; the machine is shared, so CPU seconds are the steadier figure).

Resumable: each row's result is cached as runs/lora_vs_full/<row>.json and skipped when present; a row killed
mid-way resumes from the command's own checkpoints (every 50 steps). Results: benchmarks/results/lora_vs_full.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def _row(name: str, extra: list[str], a: argparse.Namespace, work: Path) -> dict:
    cached = work / f"{name}.json"
    if cached.exists():
        print(f"[{name}] cached: {cached}", flush=True)
        return json.loads(cached.read_text())
    est_steps = a.epochs * int(0.9 * (a.train_limit or 50000)) // a.batch_size
    warmup = max(1, min(50, est_steps // 20))  # as finetune_r56.py: 5 % of the steps, at most 50
    out = work / name
    cmd = [sys.executable, "-m", "kdtoolkit", "finetune", str(DATA / "weights" / "resnet56-cifar10.th"), "--arch", "cifar_resnet56",
           "--data", str(DATA / "cifar10-jpeg.tar.gz"), "--num-classes", "10", "--mean", MEAN, "--std", STD,
           "--out", str(out), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size), "--augment", "crop_flip",
           "--warmup", str(warmup), "--seed", str(a.seed), "--checkpoint-every", "50", "--json", str(work / f"{name}.cli.json"), *extra]
    if a.train_limit:
        cmd += ["--train-limit", str(a.train_limit)]
    if a.test_limit:
        cmd += ["--test-limit", str(a.test_limit)]
    print(f"[{name}] $", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    res = json.loads((work / f"{name}.cli.json").read_text())
    hist = json.loads((out / "history.json").read_text())
    shipped = out / "adapter" / "adapter_model.safetensors" if "--adapter" in extra else out / "model.pt"
    row = {
        "row": name, "command": "kdtoolkit " + " ".join(c.replace(str(ROOT.parent), "..") for c in cmd[3:]),
        "accuracy_before": res.get("accuracy_before"), "accuracy_after": res["accuracy"], "n_test": res.get("n_test"),
        "best_val_accuracy": res.get("best_val_accuracy"), "steps": res.get("steps"),
        "trainable_params": res.get("trainable_params", res.get("params")), "model_params": res.get("params"),
        "shipped_file": shipped.name, "shipped_bytes": shipped.stat().st_size,
        "merge_max_abs_diff": res.get("merge_max_abs_diff"),
        "epoch_time_s": [h.get("epoch_time_s") for h in hist], "epoch_cpu_s": [h.get("epoch_cpu_s") for h in hist],
        "train_time_s": res.get("train_time_s"), "wall_s_last_invocation": time.perf_counter() - t0,
        "load_avg_at_end": os.getloadavg(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    cached.write_text(json.dumps(row, indent=2) + "\n")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=0.05, help="LoRA's learning rate (full fine-tuning keeps finetune_r56's 0.01)")
    ap.add_argument("--full-lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-limit", type=int, default=None, help="seeded subset of the 50k training images (tests)")
    ap.add_argument("--test-limit", type=int, default=None, help="seeded subset of the 10k test images (tests)")
    ap.add_argument("--rows", default="lora,full", help="which rows, in order")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-note", default="not stated", help="what else ran on the machine (recorded with the figures)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "lora_vs_full"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_vs_full.json"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    specs = {"lora": ["--adapter", "lora", "--rank", str(a.rank), "--lr", str(a.lora_lr)],
             "full": ["--lr", str(a.full_lr)]}
    rows = [_row(name, specs[name], a, work) for name in a.rows.split(",")]
    from kdtoolkit.envinfo import environment  # noqa: E402  (after the runs: keeps the parent process light)

    env = environment()
    out = {
        "benchmark": "lora_vs_full", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "nice -n 19 .venv/bin/python " + " ".join([Path(sys.argv[0]).as_posix().replace(str(ROOT) + "/", ""), *sys.argv[1:]]),
        "machine": {**{k: env.get(k) for k in ("cpu", "platform", "torch", "python", "torch_threads", "gpu")}, "nproc": os.cpu_count(),
                    "note": a.load_note},
        "seed": a.seed, "epochs": a.epochs, "rank": a.rank, "train_limit": a.train_limit, "test_limit": a.test_limit,
        "base": "weights/resnet56-cifar10.th (the original CIFAR-10 ResNet-56, not the -jpeg-ft one)",
        "rows": rows,
        "budget": "full data (45k train / 5k val / 10k test)" if not a.train_limit and not a.test_limit else
                  f"reduced: train_limit {a.train_limit}, test_limit {a.test_limit}",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    for r in rows:
        print(f"{r['row']}: {100 * (r['accuracy_before'] or 0):.2f} % -> {100 * r['accuracy_after']:.2f} %, "
              f"{r['trainable_params']:,} trainable, {r['shipped_file']} {r['shipped_bytes']:,} bytes, epoch {r['epoch_time_s']} s")
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()
