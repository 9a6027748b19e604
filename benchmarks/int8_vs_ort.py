"""kdtoolkit INT8 against ONNX Runtime's own quantize_static, on the machine at hand (issue 14, part 1).

    nice -n 10 .venv/bin/python benchmarks/int8_vs_ort.py [--work runs/int8_vs_ort] [--distill-steps 300] ...

Two models: the shared fine-tuned ResNet-56 teacher and a depthwise-separable student made from it by
kdtoolkit (SVD init, depth 0.23) and distilled for a few hundred steps. For each: FP32; onnxruntime's
``quantize_static`` as ORT documents it (quant_pre_process, QDQ, uint8 activations, per-channel int8
weights, MinMax, reduce_range only where the CPU lacks VNNI); kdtoolkit PTQ for ort-cpu; kdtoolkit QAT
for ort-cpu (a short run under distillation); kdtoolkit PTQ in the TensorRT scheme (symmetric s8,
entropy calibration: accuracy on ORT CPU as the proxy). All quantizers get the SAME 512 calibration images
(seeded, training split) with the teacher's ImageNet normalisation. Top-1 on all 10,000 CIFAR-10 JPEG
test images (ORT sessions); latency p50 of candidates interleaved in one process (intra-op spinning off),
the median of ``--repeats`` repeats, each with its own random order. Also recorded: Q/DQ and fused-kernel
counts of every graph after ORT's optimiser. Resumable: models and sections are cached under --work.
Results go to benchmarks/results/int8_vs_ort.json.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import MEAN, STD, shared_teacher_data  # noqa: E402  (benchmarks/ is on the path when a script runs)


def section(path: Path, fn: Callable[[], dict[str, Any]], key: str) -> dict[str, Any]:
    """Run ``fn`` once; cache its JSON so an interrupted benchmark resumes here (``key`` ties it to its inputs)."""
    from kdtoolkit import fsutil

    if path.exists():
        res = json.loads(path.read_text())
        if res.get("_key") == key:
            print(f"[bench] {path.stem}: cached", flush=True)
            return res
    t0 = time.perf_counter()
    print(f"[bench] {path.stem} ...", flush=True)
    res = fn()
    res["_seconds"] = round(time.perf_counter() - t0, 1)
    res["_key"] = key
    fsutil.write_json(path, res)
    return res


def op_counts(path: Path) -> dict[str, Any]:
    """Q/DQ count of the saved graph, and the op types ORT actually runs (its optimised graph)."""
    import tempfile

    import onnx

    from kdtoolkit.backends.ort import session_options

    m = onnx.load(str(path))
    saved = collections.Counter(n.op_type for n in m.graph.node)
    with tempfile.TemporaryDirectory() as d:
        import onnxruntime as ort

        o = Path(d) / "opt.onnx"
        ort.InferenceSession(str(path), sess_options=session_options(level="extended", optimized_path=str(o)), providers=["CPUExecutionProvider"])
        run = collections.Counter(n.op_type for n in onnx.load(str(o)).graph.node)
    return {"quantize_linear": saved.get("QuantizeLinear", 0), "dequantize_linear": saved.get("DequantizeLinear", 0),
            "relu": saved.get("Relu", 0), "ort_optimized_ops": dict(sorted(run.items()))}


def share_teacher_cache(work: Path, run_dir: Path) -> None:
    """The teacher's logits over the training split are the same for every KD run here (augmentation off):
    compute them once (about 5 minutes of ResNet-56 on 2 cores) and link them into each run's work folder."""
    import shutil

    shared, mine = work / "teacher_logits.npy", run_dir / "teacher_logits.npy"
    run_dir.mkdir(parents=True, exist_ok=True)
    if shared.exists() and not mine.exists():
        try:
            os.link(shared, mine)
        except OSError:
            shutil.copyfile(shared, mine)
    elif mine.exists() and not shared.exists():
        shutil.copyfile(mine, shared)


def ort_quantize_static(fp32: Path, out: Path, x, reduce_range: bool) -> None:
    """The baseline, as ORT documents it: pre-process, then QDQ u8/s8 per-channel MinMax."""
    import logging

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kdtoolkit import fsutil
    from kdtoolkit.quant.ptq import _Reader, model_input

    logging.getLogger().setLevel(logging.ERROR)
    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    with fsutil.atomic_path(out, suffix=".onnx") as tmp:
        quantize_static(str(pre), str(tmp), _Reader(model_input(fp32)[0], x), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    pre.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "int8_vs_ort"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--distill-steps", type=int, default=300, help="KD steps for the separable student (batch 128)")
    ap.add_argument("--qat-steps", type=int, default=60, help="QAT steps per model (batch 128, KD from the teacher)")
    ap.add_argument("--depth", type=float, default=0.23, help="student: fraction of blocks kept per stage")
    ap.add_argument("--iters", type=int, default=40, help="interleaved rounds per batch and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--test-limit", type=int, default=None, help="only for a quick try; the figures use all 10,000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_vs_ort.json"))
    a = ap.parse_args()

    import numpy as np
    import torch

    from kdtoolkit import fsutil
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.data import load_data
    from kdtoolkit.envinfo import environment
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.export.onnx_export import export_onnx, simplify
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.quant.ptq import calib_array, quantize_onnx
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    t_start = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tar, weights = shared_teacher_data()
    torch.manual_seed(a.seed)
    splits = load_data(str(tar), mean=MEAN, std=STD, seed=a.seed, test_limit=a.test_limit)
    x_cal = calib_array(splits, a.calib_size, seed=a.seed)
    prof = load_profile("ort-cpu")
    ours = scheme_for(prof)  # reduce_range resolved from this CPU (VNNI -> False), as ORT recommends
    trt = scheme_for(load_profile("jetson-agx-orin"))
    teacher = load_model(str(weights), arch="cifar_resnet56")
    teacher.module.eval()
    key = f"calib{a.calib_size}-seed{a.seed}-test{a.test_limit}"

    def acc(p: Path) -> float:
        return evaluate(make_session(p), splits.test, splits.spec)["accuracy"]

    # -- the two FP32 models --------------------------------------------------------------------------
    models: dict[str, dict[str, Any]] = {}
    d = work / "resnet56"
    d.mkdir(exist_ok=True)
    if not (d / "fp32.onnx").exists():
        export_onnx(teacher.module, (1, 3, 32, 32), d / "raw.onnx")
        simplify(d / "raw.onnx", d / "fp32.onnx")
    models["resnet56"] = {"dir": d, "module": teacher.module, "what": "cifar_resnet56 fine-tuned on CIFAR-10 JPEG (shared teacher)"}

    d = work / "separable_student"
    d.mkdir(exist_ok=True)
    ck = d / "student.pt"
    if not ck.exists():
        from kdtoolkit.data import batches
        from kdtoolkit.distill.trainer import TrainConfig, Trainer
        from kdtoolkit.student.build import StudentConfig, make_student

        calib = batches(splits.train, splits.spec, 64, shuffle=True, seed=a.seed)
        s, recipe, _ = make_student(teacher, StudentConfig(separable=True, init="svd", depth=a.depth), input_shape=(1, 3, 32, 32),
                                    num_classes=10, calib_batches=calib)
        print(f"[bench] distilling the separable student for {a.distill_steps} steps", flush=True)
        cfg = TrainConfig(epochs=1, max_steps=a.distill_steps, batch_size=128, lr=0.05, augment="none", seed=a.seed)
        share_teacher_cache(work, d / "distill-work")
        s = Trainer(cfg, d / "distill-work", progress=True).fit(s.train(), splits, teacher=teacher.module)["model"].eval()
        share_teacher_cache(work, d / "distill-work")
        with fsutil.atomic_path(ck, suffix=".pt") as tmp:
            torch.save({"model": s, "recipe": recipe}, tmp)
    student = torch.load(ck, weights_only=False)["model"].eval()
    if not (d / "fp32.onnx").exists():
        export_onnx(student, (1, 3, 32, 32), d / "raw.onnx")
        simplify(d / "raw.onnx", d / "fp32.onnx")
    models["separable_student"] = {"dir": d, "module": student,
                                   "what": f"kdtoolkit student of the teacher: depthwise-separable, SVD init, depth {a.depth}, "
                                           f"{a.distill_steps} KD steps"}

    results: dict[str, Any] = {}
    for name, mm in models.items():
        d, fp32 = mm["dir"], mm["dir"] / "fp32.onnx"
        k = f"{key}-{fsutil.sha256_file(fp32)[:16]}"
        paths = {"fp32": fp32, "ort_quantize_static": d / "ort_quantize_static.onnx", "kdtoolkit_ptq": d / "kdtoolkit_ptq.onnx",
                 "kdtoolkit_qat": d / "kdtoolkit_qat.onnx", "kdtoolkit_tensorrt_scheme_ptq": d / "kdtoolkit_trt_ptq.onnx"}

        def build() -> dict[str, Any]:
            info: dict[str, Any] = {}
            t = time.perf_counter()
            ort_quantize_static(fp32, paths["ort_quantize_static"], x_cal, reduce_range=ours.reduce_range)
            info["ort_quantize_static_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            info["kdtoolkit_ptq"] = quantize_onnx(fp32, paths["kdtoolkit_ptq"], x_cal, ours, method="minmax")
            info["kdtoolkit_ptq_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            info["kdtoolkit_trt"] = quantize_onnx(fp32, paths["kdtoolkit_tensorrt_scheme_ptq"], x_cal, trt, method="entropy")
            info["kdtoolkit_trt_s"] = round(time.perf_counter() - t, 1)
            return info

        b = section(d / "build.json", build, k)

        def qat() -> dict[str, Any]:
            from kdtoolkit.quant.ptq import align_input_channels
            from kdtoolkit.quant.qat import QatConfig, export_qdq, run_qat

            cfg = QatConfig(epochs=1, max_steps=a.qat_steps, batch_size=128, lr=0.002, seed=a.seed, init="mse")
            share_teacher_cache(work, d / "qat-work")
            gm, qi = run_qat(mm["module"], teacher.module, splits, ours, cfg, d / "qat-work", calib_size=a.calib_size, progress=True)
            qi.update(export_qdq(gm, (1, 3, 32, 32), paths["kdtoolkit_qat"]))
            qi["channel_aligned_convs"] = align_input_channels(paths["kdtoolkit_qat"])
            return qi

        q = section(d / "qat.json", qat, k + f"-qat{a.qat_steps}") if a.qat_steps > 0 else None
        if q is None:
            paths.pop("kdtoolkit_qat")

        def accuracy() -> dict[str, Any]:
            out = {}
            for n, p in paths.items():
                out[n] = acc(p)
                print(f"[bench]   {name} {n}: {100 * out[n]:.2f} %", flush=True)
            return out

        accs = section(d / "accuracy.json", accuracy, k + f"-qat{a.qat_steps}")

        def latency() -> dict[str, Any]:
            from kdtoolkit.backends.ort import OrtRunner
            from kdtoolkit.latency.timing import measure

            timed = [n for n in paths if n != "kdtoolkit_tensorrt_scheme_ptq"]  # TensorRT's speed is the device's
            runners = [OrtRunner(paths[n], name=n) for n in timed]
            per: dict[str, dict[str, list[float]]] = {n: {"1": [], "64": []} for n in timed}
            try:
                for rep in range(a.repeats):
                    r = measure(runners, [1, 64], warmup=10, iters=a.iters, seed=rep)
                    for n in timed:
                        for bb in (1, 64):
                            per[n][str(bb)].append(r[n][bb]["p50"])
            finally:
                for r_ in runners:
                    r_.close()
            med = {n: {bb: float(np.median(v)) for bb, v in pb.items()} for n, pb in per.items()}
            return {"p50_ms_per_repeat": per, "p50_ms_median": med,
                    "speed_vs_fp32": {n: {bb: med["fp32"][bb] / med[n][bb] for bb in med[n]} for n in timed},
                    "speed_vs_ort_quantize_static": {n: {bb: med["ort_quantize_static"][bb] / med[n][bb] for bb in med[n]} for n in timed}}

        lat = section(d / "latency.json", latency, k + f"-qat{a.qat_steps}-r{a.repeats}-i{a.iters}")
        graphs = {n: op_counts(p) for n, p in paths.items() if n != "fp32"}
        rows = []
        for n in paths:
            rows.append({"row": n, "top1": accs[n],
                         "top1_minus_ort_points": round(100 * (accs[n] - accs["ort_quantize_static"]), 2),
                         "speed_vs_fp32": lat["speed_vs_fp32"].get(n), "speed_vs_ort_quantize_static": lat["speed_vs_ort_quantize_static"].get(n),
                         "p50_ms": lat["p50_ms_median"].get(n)})
        results[name] = {"model": mm["what"], "rows": rows, "graphs": graphs,
                         "build": {k_: v for k_, v in b.items() if not k_.startswith("_")},
                         "qat": {k_: v for k_, v in (q or {}).items() if not k_.startswith("_")},
                         "latency_p50_ms_per_repeat": lat["p50_ms_per_repeat"]}

    env = environment()
    doc = {
        "benchmark": "int8_vs_ort",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": {"cpu": env.get("cpu"), "platform": platform.platform(), "onnxruntime": env.get("onnxruntime"),
                    "torch": env.get("torch"), "onnx": env.get("onnx"),
                    "threads": "ORT default (all cores), intra-op spinning off, candidates interleaved in one process"},
        "setup": {"data": "CIFAR-10 JPEG (shared/data/cifar10-jpeg.tar.gz), ImageNet mean/std normalisation",
                  "test_images": len(splits.test), "calibration": f"{a.calib_size} seeded training images, the same array for every quantizer",
                  "ort_baseline": "onnxruntime.quantization.quant_pre_process + quantize_static(QDQ, QUInt8 activations, per-channel "
                                  f"QInt8 weights, MinMax, reduce_range={ours.reduce_range} (VNNI: {not ours.reduce_range}))",
                  "kdtoolkit_ptq": "kdtoolkit.quant.ptq.quantize_onnx, scheme ort_x86 from the ort-cpu profile, minmax",
                  "kdtoolkit_qat": f"kdtoolkit.quant.qat.run_qat, {a.qat_steps} steps batch 128 under KD from the teacher, MSE-initialised "
                                   "learned activation scales, exported QDQ",
                  "kdtoolkit_tensorrt_scheme_ptq": "scheme tensorrt (symmetric s8, per-channel weights), entropy calibration; accuracy on "
                                                   "ORT CPU as a proxy, speed not timed (TensorRT's, on the device)",
                  "timing": f"p50 per candidate, {a.iters} interleaved rounds per batch, median of {a.repeats} repeats (random order, own seed each)",
                  "nvidia_modelopt": "not run: it needs its own virtual environment (onnx 1.21, onnxruntime-gpu, cupy); see DESIGN.md for its "
                                     "figures on an AMD EPYC"},
        "results": results,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    fsutil.write_json(Path(a.out), doc)
    for name, r in results.items():
        print(f"\n{name}: {r['model']}")
        print(f"  {'row':32s} {'top-1':>7s} {'vs ORT':>7s} {'b1 xFP32':>9s} {'b64 xFP32':>9s} {'b1 xORT':>8s} {'b64 xORT':>8s}")
        for row in r["rows"]:
            sf, so = row["speed_vs_fp32"] or {}, row["speed_vs_ort_quantize_static"] or {}
            f = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
            print(f"  {row['row']:32s} {100 * row['top1']:6.2f}% {row['top1_minus_ort_points']:+6.2f} {f(sf.get('1')):>9s} {f(sf.get('64')):>9s} "
                  f"{f(so.get('1')):>8s} {f(so.get('64')):>8s}")
    print(f"\nwrote {a.out} ({doc['wall_s']} s)")


if __name__ == "__main__":
    main()
