"""INT8 for a small ViT on ONNX Runtime CPU: static QDQ against dynamic quantization (issue 17, item 4).

    nice -n 19 .venv/bin/python benchmarks/vit_int8.py [--work runs/vit_int8] [--train-minutes 10] [--repeats 3]

The model: a timm ViT (img 32, patch 4, dim 192, depth 6, 3 heads: ``vit_tiny_patch16_224`` rebuilt for
CIFAR) trained from scratch on CIFAR-10 JPEG for a fixed wall-clock budget (``--train-minutes``; the
budget and the steps it reached are recorded: this is a realistic-weights model to time and quantize,
not a good classifier). It is saved as a timm folder (config.json + model.safetensors) and loaded back
through kdtoolkit's front door, exported with kdtoolkit's exporter (opset 17, dynamic batch) and then:

- ``fp32``: the export;
- ``static_ort_ops``: ORT's quantize_static with its own QDQ op registry (MatMul with Q/DQ on both inputs,
  LayerNormalization between a DQ and a Q, Softmax and Erf float): what kdtoolkit's ort-cpu PTQ does;
- ``static_transformer_ops``: the same without LayerNormalization in the op list (kdtoolkit.quant.ptq.
  transformer_op_types), to see whether leaving LayerNorm out of Q/DQ pays;
- ``dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (int8 MatMul/Gemm weights, activation
  ranges computed at run time), what kdtoolkit's ``--int8-mode dynamic`` makes.

The same 512 seeded training images calibrate both static models. Top-1 on the CIFAR-10 JPEG test
set (ORT sessions); latency p50 of all candidates interleaved in one process (intra-op spinning off),
the median of ``--repeats`` repeats with their own random order (kdtoolkit.latency.timing.measure).
Results: benchmarks/results/vit_int8.json, with the CPU flags of the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's own statistics
VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3, "num_classes": 10}


def train(folder: Path, splits: Any, minutes: float, seed: int) -> dict[str, Any]:
    """Train the ViT from scratch for ``minutes`` of wall clock (AdamW, cosine, crop+flip); save it as a timm folder."""
    import torch
    import torch.nn.functional as F
    from timm.models import create_model, save_for_hf

    from kdtoolkit.data import batches
    from kdtoolkit.data.datasets import augment_batch

    torch.manual_seed(seed)
    model = create_model("vit_tiny_patch16_224", pretrained=False, **VIT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    budget, t0, step, epoch, losses = minutes * 60.0, time.perf_counter(), 0, 0, []
    est_steps = None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    while time.perf_counter() - t0 < budget:
        for x, y in batches(splits.train, splits.spec, 128, shuffle=True, seed=seed, epoch=epoch, drop_last=True):
            el = time.perf_counter() - t0
            if el >= budget:
                break
            if step == 5:  # schedule over the steps the budget allows, estimated from the first ones
                est_steps = int(budget / (el / 5))
            frac = min(1.0, step / est_steps) if est_steps else 0.0
            lr = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + __import__("math").cos(__import__("math").pi * frac))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(augment_batch(x, gen)), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            step += 1
            if step % 20 == 0:
                print(f"[train] step {step} loss {sum(losses[-20:]) / 20:.3f} {time.perf_counter() - t0:.0f}s", flush=True)
        epoch += 1
    model.eval()
    save_for_hf(model, str(folder), data_config={"mean": MEAN, "std": STD}, safe_serialization=True)
    return {"steps": step, "batch": 128, "wall_s": round(time.perf_counter() - t0, 1), "budget_min": minutes,
            "epochs_seen": round(step * 128 / len(splits.train), 2), "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 3),
            "optimizer": "AdamW lr 1e-3 (50-step warm-up, cosine over the estimated steps), wd 0.05, label smoothing 0.1, crop+flip"}


def run_rest(a: Any, work: Path, folder: Path, splits: Any, tinfo: dict[str, Any], t_start: float, what: str | None = None) -> None:
    """Export, quantize three ways, measure accuracy and interleaved latency, write the JSON."""
    import collections
    import logging

    import numpy as np
    import onnx
    from onnxruntime.quantization import quantize_static

    from kdtoolkit import fsutil
    from kdtoolkit.backends.ort import OrtRunner, make_session
    from kdtoolkit.envinfo import environment
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.export.onnx_export import export_onnx, simplify
    from kdtoolkit.latency.timing import measure
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.quant.ptq import _Reader, calib_array, model_input, quantize_dynamic_onnx, transformer_op_types
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    teacher = load_model(str(folder))  # through the front door: a timm folder (config.json + model.safetensors) or --teacher
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        export_onnx(teacher.module, (1, 3, 32, 32), work / "raw.onnx", opset=17)
        simplify(work / "raw.onnx", fp32)
    scheme = scheme_for(load_profile("ort-cpu"))
    x_cal = calib_array(splits, a.calib_size, seed=a.seed)
    paths = {"fp32": fp32, "static_ort_ops": work / "static_ort_ops.onnx", "static_transformer_ops": work / "static_transformer_ops.onnx",
             "dynamic": work / "dynamic.onnx"}
    build: dict[str, Any] = {}
    t = time.perf_counter()
    # before issue 17: ORT's own registry (op_types_to_quantize=None), exactly what quantize_onnx passed for ORT schemes
    kw = scheme.ort_kwargs()
    extra = dict(kw.pop("extra_options"))
    logging.getLogger().setLevel(logging.ERROR)
    with fsutil.atomic_path(paths["static_ort_ops"], suffix=".onnx") as tmp:
        quantize_static(str(fp32), str(tmp), _Reader(model_input(fp32)[0], x_cal), extra_options=extra, **kw)
    build["static_ort_ops_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    kw2 = scheme.ort_kwargs()
    extra2 = dict(kw2.pop("extra_options"))
    kw2["op_types_to_quantize"] = transformer_op_types()
    with fsutil.atomic_path(paths["static_transformer_ops"], suffix=".onnx") as tmp:
        quantize_static(str(fp32), str(tmp), _Reader(model_input(fp32)[0], x_cal), extra_options=extra2, **kw2)
    build["static_transformer_ops"] = {"op_types": kw2["op_types_to_quantize"]}
    build["static_transformer_ops_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    build["dynamic"] = quantize_dynamic_onnx(fp32, paths["dynamic"], scheme)
    build["dynamic_s"] = round(time.perf_counter() - t, 1)
    graphs = {n: dict(collections.Counter(nd.op_type for nd in onnx.load(str(p)).graph.node).most_common(12)) for n, p in paths.items()}

    accs = {}
    for n, p in paths.items():
        accs[n] = evaluate(make_session(p), splits.test, splits.spec)["accuracy"]
        print(f"[bench] {n}: top-1 {100 * accs[n]:.2f} %", flush=True)
    runners = [OrtRunner(p, name=n) for n, p in paths.items()]
    per: dict[str, dict[str, list[float]]] = {n: {"1": [], "64": []} for n in paths}
    try:
        for rep in range(a.repeats):
            r = measure(runners, [1, 64], warmup=5, iters=a.iters, seed=rep)
            for n in paths:
                for bb in (1, 64):
                    per[n][str(bb)].append(r[n][bb]["p50"])
    finally:
        for r_ in runners:
            r_.close()
    med = {n: {bb: float(np.median(v)) for bb, v in pb.items()} for n, pb in per.items()}
    rows = [{"row": n, "top1": accs[n], "top1_minus_fp32_points": round(100 * (accs[n] - accs["fp32"]), 2), "p50_ms": med[n],
             "speed_vs_fp32": {bb: round(med["fp32"][bb] / med[n][bb], 3) for bb in med[n]}} for n in paths]
    env = environment()
    doc = {
        "benchmark": "vit_int8",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": {"cpu": env.get("cpu"), "platform": platform.platform(), "onnxruntime": env.get("onnxruntime"), "torch": env.get("torch"),
                    "onnx": env.get("onnx"), "timm": env.get("timm"),
                    "threads": "ORT default (all cores), intra-op spinning off, candidates interleaved in one process",
                    "load_note": a.load_note},
        "model": {"what": what or "timm vit_tiny_patch16_224 rebuilt for CIFAR: " + json.dumps(VIT), "params": sum(p.numel() for p in teacher.module.parameters()),
                  "training": tinfo if what else {**tinfo, "note": "trained from scratch for a wall-clock budget only, to have realistic "
                                                                   "(not random) weights; not a good classifier"},
                  "export": "kdtoolkit export_onnx, opset 17 (LayerNormalization native), dynamic batch, onnxslim"},
        "setup": {"data": "CIFAR-10 JPEG, CIFAR-10 mean/std", "test_images": len(splits.test),
                  "calibration": f"{a.calib_size} seeded training images (both static rows)", "scheme": scheme.to_manifest(),
                  "rows": {"static_ort_ops": "quantize_static, ORT's QDQ registry (LayerNormalization wrapped in Q/DQ): what kdtoolkit's ort-cpu PTQ does",
                           "static_transformer_ops": "quantize_static, ORT's registry minus normalisations (LayerNorm left out of Q/DQ)",
                           "dynamic": "kdtoolkit quantize_dynamic_onnx: onnxruntime quantize_dynamic, MatMul/Gemm int8 weights per channel"},
                  "timing": f"p50 per candidate, {a.iters} interleaved rounds per batch, median of {a.repeats} repeats"},
        "rows": rows, "graphs_top_ops": graphs, "build": build, "p50_ms_per_repeat": per,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    fsutil.write_json(Path(a.out), doc)
    print(f"{'row':26s} {'top-1':>7s} {'vs FP32':>8s} {'b1 ms':>8s} {'b64 ms':>8s} {'b1 x':>6s} {'b64 x':>6s}")
    for r in rows:
        print(f"{r['row']:26s} {100 * r['top1']:6.2f}% {r['top1_minus_fp32_points']:+7.2f} {r['p50_ms']['1']:8.3f} {r['p50_ms']['64']:8.2f} "
              f"{r['speed_vs_fp32']['1']:5.2f}x {r['speed_vs_fp32']['64']:5.2f}x")
    print(f"wrote {a.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "vit_int8"))
    ap.add_argument("--train-minutes", type=float, default=10.0)
    ap.add_argument("--teacher", default=None, help="a trained ViT checkpoint to quantize instead of training one here "
                    "(benchmarks/vit_student.py's teacher: runs/vit_student/teacher/teacher.pt, its result.json beside it)")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test-limit", type=int, default=None, help="only for a quick try; the figures use all 10,000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-note", default="not stated", help="what else ran on the machine (recorded with the figures)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vit_int8.json"))
    a = ap.parse_args()

    from kdtoolkit import fsutil
    from kdtoolkit.data import load_data

    t_start = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tar = DATA / "cifar10-jpeg.tar.gz"
    if not tar.exists():
        sys.exit(f"error: needs {tar} (the shared data folder beside the checkout)")
    splits = load_data(str(tar), mean=MEAN, std=STD, seed=a.seed, test_limit=a.test_limit)
    if a.teacher:  # the trained teacher of benchmarks/vit_student.py: quantize it, train nothing here
        tpath = Path(a.teacher)
        if not tpath.exists():
            sys.exit(f"error: no such teacher: {tpath} (run benchmarks/vit_student.py --part teacher first)")
        res_json = tpath.parent / "result.json"
        tinfo = json.loads(res_json.read_text()) if res_json.exists() else {}
        tinfo = {k: tinfo.get(k) for k in ("test_accuracy", "steps", "epochs", "train_time_s", "budget_min", "arch", "params")}
        run_rest(a, work, tpath, splits, {"source": str(tpath.relative_to(ROOT)) if tpath.is_relative_to(ROOT) else str(tpath), **tinfo},
                 t_start, what="kdtoolkit cifar_vit trained by benchmarks/vit_student.py --part teacher")
        return
    folder = work / "vit-timm"
    tinfo_path = work / "train.json"
    if not (folder / "config.json").exists() or not tinfo_path.exists():
        tinfo = train(folder, splits, a.train_minutes, a.seed)
        fsutil.write_json(tinfo_path, tinfo)
    tinfo = json.loads(tinfo_path.read_text())
    if a.train_only:
        print(json.dumps(tinfo))
        return
    run_rest(a, work, folder, splits, tinfo, t_start)


if __name__ == "__main__":
    main()
