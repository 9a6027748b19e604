"""Which student shape buys the most capacity inside the headline's speed budget (issue 14, part 2).

    nice -n 10 .venv/bin/python benchmarks/student_shape.py [--repeats 3] [--iters 40]

Candidates are made from the shared fine-tuned ResNet-56 by kdtoolkit's own surgery (depth reduction,
depthwise-separable conversion with SVD init, chosen stages kept standard) and timed untrained: latency
does not depend on the weights. Each is timed in FP32 and as kdtoolkit's ort-cpu INT8 (PTQ on 256 seeded
training images), interleaved with the teacher's FP32 in one process at batch 1 and 64 (p50, median of
``--repeats`` repeats, random order each). A candidate fits when its faster precision is at least 5x the
teacher at batch 1 and 10x at batch 64 (the headline's targets). Parameters stand for capacity: of the
shapes that fit with ``--margin`` to spare (ratios moved by 5 % between quiet runs of this script, and by
25 % at batch 64 between two timings of the headline when the host slowed: reference.json's load_note), the one with the most parameters is the headline's student. Untrained top-1 is not a
measure of anything, so the accuracy side is left to the training runs (benchmarks/reference.py).
Results go to benchmarks/results/student_shape.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import MEAN, STD, shared_teacher_data  # noqa: E402  (benchmarks/ is on the path when a script runs)

# name -> StudentConfig fields. ResNet-56 has 9 blocks per stage: depth 0.23 keeps 2, 0.34 keeps 3.
CANDIDATES: dict[str, dict[str, Any]] = {
    "sep-d0.23": {"depth": 0.23},
    "sep-d0.34": {"depth": 0.34},
    "sep-d0.23-layer3-std": {"depth": 0.23, "skip": ["layer3"]},
    "sep-d0.23-layer23-std": {"depth": 0.23, "skip": ["layer2", "layer3"]},
    "sep-d0.34-layer3-std": {"depth": 0.34, "skip": ["layer3"]},
    "std-d0.12": {"depth": 0.12, "separable": False},
    "std-d0.23": {"depth": 0.23, "separable": False},
    # late-heavy (keep_blocks): no block at 32x32 (16 channels), one at 16x16, k at 8x8 (64 channels)
    **{f"std-keep-{a}-{b}-{c}": {"keep_blocks": {"layer1": a, "layer2": b, "layer3": c}, "separable": False}
       for a, b, c in ((0, 1, 2), (0, 1, 3), (0, 1, 4), (0, 1, 5), (0, 1, 6), (0, 2, 2), (1, 1, 2))},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "student_shape"))
    ap.add_argument("--only", nargs="*", default=None, help="candidate names (default: all)")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--margin", type=float, default=1.1, help="choose among shapes that fit with this factor to spare")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "student_shape.json"))
    a = ap.parse_args()

    import numpy as np
    import torch

    from kdtoolkit import fsutil
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.data import batches, load_data
    from kdtoolkit.envinfo import environment
    from kdtoolkit.export.onnx_export import export_onnx, simplify
    from kdtoolkit.latency.timing import measure
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.quant.ptq import align_input_channels, calib_array, quantize_onnx
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.student.build import StudentConfig, count_macs, count_params, make_student
    from kdtoolkit.targets import load_profile

    t0 = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tar, weights = shared_teacher_data()
    torch.manual_seed(0)
    splits = load_data(str(tar), mean=MEAN, std=STD, seed=0, train_limit=2000, test_limit=100)
    x_cal = calib_array(splits, 256, seed=0)
    scheme = scheme_for(load_profile("ort-cpu"))
    teacher = load_model(str(weights), arch="cifar_resnet56")
    teacher.module.eval()
    shape = (1, 3, 32, 32)

    def onnx_pair(name: str, module) -> dict[str, Path]:
        d = work / name
        d.mkdir(exist_ok=True)
        fp32, int8 = d / "fp32.onnx", d / "int8.onnx"
        if not fp32.exists():
            export_onnx(module, shape, d / "raw.onnx")
            simplify(d / "raw.onnx", fp32)
        if not int8.exists():
            quantize_onnx(fp32, int8, x_cal, scheme, method="minmax")
            align_input_channels(int8)
        return {"fp32": fp32, "int8": int8}

    teacher_paths = onnx_pair("teacher", teacher.module)
    rows: dict[str, dict[str, Any]] = {"teacher": {"params": count_params(teacher.module),
                                                   "macs": count_macs(teacher.module, shape), "config": None}}
    paths = {"teacher/fp32": teacher_paths["fp32"], "teacher/int8": teacher_paths["int8"]}
    for name, fields in CANDIDATES.items():
        if a.only and name not in a.only:
            continue
        calib = batches(splits.train, splits.spec, 64, shuffle=True, seed=0)
        s, _, info = make_student(teacher, StudentConfig(init="svd", **fields), input_shape=shape, num_classes=10, calib_batches=calib)
        s.eval()
        rows[name] = {"params": count_params(s), "macs": count_macs(s, shape), "config": fields,
                      "converted": len(info.get("converted", []))}
        for prec, p in onnx_pair(name, s).items():
            paths[f"{name}/{prec}"] = p
        print(f"[bench] {name}: {rows[name]['params']:,} params, {rows[name]['macs'] / 1e6:.1f} M MACs", flush=True)

    runners = [OrtRunner(p, name=n) for n, p in paths.items()]
    per: dict[str, dict[int, list[float]]] = {n: {1: [], 64: []} for n in paths}
    try:
        for rep in range(a.repeats):
            r = measure(runners, [1, 64], warmup=10, iters=a.iters, seed=rep)
            for n in paths:
                for b in (1, 64):
                    per[n][b].append(r[n][b]["p50"])
    finally:
        for r_ in runners:
            r_.close()
    med = {n: {b: float(np.median(v)) for b, v in pb.items()} for n, pb in per.items()}
    base = med["teacher/fp32"]
    for name, row in rows.items():
        row["p50_ms"] = {prec: med[f"{name}/{prec}"] for prec in ("fp32", "int8")}
        row["speedup_vs_teacher_fp32"] = {prec: {str(b): base[b] / med[f"{name}/{prec}"][b] for b in (1, 64)}
                                          for prec in ("fp32", "int8")}
        best = {str(b): max(row["speedup_vs_teacher_fp32"][p][str(b)] for p in ("fp32", "int8")) for b in (1, 64)}
        row["best_speedup"] = best
        row["fits_5x_10x"] = best["1"] >= 5.0 and best["64"] >= 10.0
        row["fits_with_margin"] = best["1"] >= 5.0 * a.margin and best["64"] >= 10.0 * a.margin
    fitting = [n for n, r in rows.items() if r["fits_with_margin"]]
    chosen = max(fitting, key=lambda n: rows[n]["params"]) if fitting else None
    env = environment()
    doc = {
        "benchmark": "student_shape",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": {"cpu": env.get("cpu"), "platform": platform.platform(), "onnxruntime": env.get("onnxruntime"),
                    "threads": "ORT default (all cores), intra-op spinning off, candidates interleaved in one process",
                    "load_avg_at_end": list(os.getloadavg())},
        "setup": {"teacher": "cifar_resnet56 fine-tuned on CIFAR-10 JPEG (shared)", "int8": "kdtoolkit PTQ, ort-cpu scheme, minmax, 256 images",
                  "timing": f"p50, {a.iters} interleaved rounds per batch, median of {a.repeats} repeats"},
        "rows": rows, "margin": a.margin, "chosen": chosen, "wall_s": round(time.perf_counter() - t0, 1),
    }
    fsutil.write_json(Path(a.out), doc)
    print(f"\n{'candidate':26s} {'params':>9s} {'MMACs':>7s} {'fp32 b1':>8s} {'fp32 b64':>9s} {'int8 b1':>8s} {'int8 b64':>9s}  fits")
    for n, r in rows.items():
        s_ = r["speedup_vs_teacher_fp32"]
        print(f"{n:26s} {r['params']:9,d} {r['macs'] / 1e6:7.1f} {s_['fp32']['1']:7.2f}x {s_['fp32']['64']:8.2f}x "
              f"{s_['int8']['1']:7.2f}x {s_['int8']['64']:8.2f}x  {'yes' if r['fits_5x_10x'] else 'no'}")
    print(f"chosen: {chosen}\nwrote {a.out} ({doc['wall_s']} s)")


if __name__ == "__main__":
    main()
