"""Student figures (issue 3), on the CIFAR-10 JPEG data with the fine-tuned ResNet-56 teacher.

1. Latency table, ONNX Runtime CPU, every candidate interleaved with the teacher in one process,
   batch 1 and 64: separable ResNet-56, 0.5-width ResNet-56, and the ResNet-20-depth students
   (separable; half width) derived from the teacher.
2. Teacher-initialised (rank-1 SVD + BN re-estimation) vs randomly initialised separable student,
   both distilled with the same budget (1 and 3 epochs on a seeded training subset): test top-1.
3. The latency-budget search meets its budget on a re-measurement in a fresh interleaved run.

Resumable: each part's result is stored in benchmarks/results/student.json as it finishes and is
skipped on a rerun (delete the key to redo it).

    python benchmarks/student_bench.py --train-limit 10000 --epochs 1,3
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "student.json"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPE = (1, 3, 32, 32)


def _save(res: dict) -> None:
    from kdtoolkit import fsutil

    fsutil.write_json(OUT, res)


def part_latency(teacher, iters: int) -> dict:
    from kdtoolkit.student.build import StudentConfig, count_macs, count_params, make_student
    from kdtoolkit.student.search import measure_models

    cands = {
        "separable_r56": StudentConfig(),
        "width0.5_r56": StudentConfig(separable=False, width=0.5),
        "separable_r20depth": StudentConfig(depth=0.34),
        "width0.5_r20depth": StudentConfig(separable=False, depth=0.34, width=0.5),
        "separable_width0.5_r20depth": StudentConfig(depth=0.34, width=0.5),
    }
    models = {"teacher": teacher.module}
    for name, cfg in cands.items():
        models[name] = make_student(teacher, cfg, input_shape=SHAPE, num_classes=10)[0].eval()
    lat = measure_models(models, SHAPE, [1, 64], iters=iters)
    rows = []
    for name, m in models.items():
        rows.append({"name": name, "params": count_params(m), "macs": count_macs(m, SHAPE),
                     "p50_b1_ms": lat[name][1]["p50"], "p50_b64_ms": lat[name][64]["p50"],
                     "speedup_b1": lat["teacher"][1]["p50"] / lat[name][1]["p50"],
                     "speedup_b64": lat["teacher"][64]["p50"] / lat[name][64]["p50"]})
    return {"rows": rows, "timing_rounds": iters, "runtime": "onnxruntime-cpu, interleaved, spinning off"}


def part_init(teacher, splits, epochs_list: list[int], seed: int) -> dict:
    from kdtoolkit.data import batches
    from kdtoolkit.distill.trainer import TrainConfig, Trainer
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.student.build import StudentConfig, make_student

    out: dict = {}
    for init in ("svd", "random"):
        cfg = StudentConfig(depth=0.34, init=init)
        calib = batches(splits.train, splits.spec, 64, shuffle=True, seed=seed)
        base, _, info = make_student(teacher, cfg, input_shape=SHAPE, num_classes=10, calib_batches=calib)
        before = evaluate(base, splits.test, splits.spec)["accuracy"]
        out[init] = {"before_training": before, "rank1_energy_mean": info.get("rank1_energy_mean")}
        for ep in epochs_list:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            tc = TrainConfig(epochs=ep, batch_size=128, lr=0.05, seed=seed, augment="none")
            work = REPO / "runs" / "student_bench" / f"{init}-e{ep}-n{len(splits.train)}-s{seed}"
            res = Trainer(tc, work, progress=True).fit(model.train(), splits, teacher=teacher.module)
            acc = evaluate(res["model"], splits.test, splits.spec)["accuracy"]
            out[init][f"epochs_{ep}"] = {"test_accuracy": acc, "train_time_s": time.perf_counter() - t0, "steps": res["steps"]}
            print(f"init={init} epochs={ep}: test top-1 {100 * acc:.2f} %", flush=True)
    return out


def part_search(teacher, budget_ms: float, iters: int) -> dict:
    from kdtoolkit.student.build import StudentConfig, make_student
    from kdtoolkit.student.search import measure_models, search

    found = search(teacher, StudentConfig(), budget_ms=budget_ms, input_shape=SHAPE, num_classes=10, batch=1, iters=iters)
    chosen = make_student(teacher, found["config"], input_shape=SHAPE, num_classes=10)[0].eval()
    again = measure_models({"teacher": teacher.module, "chosen": chosen}, SHAPE, [1], iters=iters)
    return {"budget_ms": budget_ms, "chosen": found["chosen"], "search_p50_ms": next(c["p50_ms"] for c in found["candidates"] if c["name"] == found["chosen"]),
            "remeasured_p50_ms": again["chosen"][1]["p50"], "meets_budget_on_remeasure": again["chosen"][1]["p50"] <= budget_ms,
            "candidates": found["candidates"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--teacher", type=Path, default=REPO.parent / "shared" / "data" / "weights" / "resnet56-cifar10-jpeg-ft.th")
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--epochs", default="1,3")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--budget-ms", type=float, default=None, help="default: half the teacher's batch-1 p50 from part 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="latency,init,search")
    args = ap.parse_args()
    for p in (args.data, args.teacher):
        if not p.exists():
            sys.exit(f"missing {p}: the shared data folder must sit beside the checkout")
    from kdtoolkit.data import load_data
    from kdtoolkit.envinfo import environment
    from kdtoolkit.models import load_model

    res = json.loads(OUT.read_text()) if OUT.exists() else {}
    res.update({"machine": environment()["cpu"], "command": " ".join(["python", "benchmarks/student_bench.py", *sys.argv[1:]])})
    teacher = load_model(args.teacher, arch="cifar_resnet56")
    parts = args.parts.split(",")
    if "latency" in parts and "latency" not in res:
        res["latency"] = part_latency(teacher, args.iters)
        res["latency"]["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        _save(res)
    if "init" in parts and "init" not in res:
        splits = load_data(str(args.data), mean=MEAN, std=STD, train_limit=args.train_limit, seed=args.seed)
        res["init"] = {"train_limit": args.train_limit, "seed": args.seed, "budget": "SGD lr 0.05 cosine, batch 128, KD alpha 0.9 T 4, no augmentation",
                       **part_init(teacher, splits, [int(e) for e in args.epochs.split(",")], args.seed)}
        res["init"]["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        _save(res)
    if "search" in parts and "search" not in res:
        budget = args.budget_ms or 0.5 * next(r["p50_b1_ms"] for r in res["latency"]["rows"] if r["name"] == "teacher")
        res["search"] = part_search(teacher, budget, args.iters)
        _save(res)
    print(json.dumps({k: v for k, v in res.items() if k in ("latency", "search")}, indent=1)[:4000])
    if "init" in res:
        print(json.dumps(res["init"], indent=1))


if __name__ == "__main__":
    main()
