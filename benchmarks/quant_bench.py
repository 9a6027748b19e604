"""INT8 on ONNX Runtime CPU: QAT under distillation vs FP32, vs ORT's own quantize_static, the
TensorRT-scheme ONNX on ORT CPU, and PTQ calibration methods side by side.

    nice -n 10 .venv/bin/python benchmarks/quant_bench.py [--work runs/quant_bench] [--train-limit 8000] ...

The student is made by kdtoolkit's own ``compress`` (teacher -> separable student -> distill ->
export -> quantize (QAT, precision auto) -> optimize -> profile) from the fine-tuned ResNet-56 in
../shared/data on a seeded subset of the CIFAR-10 JPEG training split with a short budget, so the
run fits in about 40 minutes on 2 cores. Every step is resumable: compress skips finished stages
and each later section is cached in WORK/sections/*.json. Accuracy is top-1 of an ONNX Runtime
session on the (seeded subset of the) test split; latency is p50 of candidates interleaved in one
process (intra-op spinning off). Results go to benchmarks/results/quant.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


_KEY = {"fp32": ""}


def section(work: Path, name: str, fn):
    """Run ``fn`` once per FP32 student; cache its JSON result so an interrupted benchmark resumes here."""
    p = work / "sections" / f"{name}.json"
    if p.exists():
        res = json.loads(p.read_text())
        if res.get("_fp32_sha256") == _KEY["fp32"]:
            print(f"[bench] {name}: cached ({p})", flush=True)
            return res
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    res = fn()
    res["_seconds"] = round(time.perf_counter() - t0, 1)
    res["_fp32_sha256"] = _KEY["fp32"]
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2, default=str))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "quant_bench"))
    ap.add_argument("--train-limit", type=int, default=8000, help="seeded subset of the training split")
    ap.add_argument("--test-limit", type=int, default=5000, help="seeded subset of the test split")
    ap.add_argument("--epochs", type=int, default=2, help="distillation epochs")
    ap.add_argument("--depth", type=float, default=0.5, help="student: fraction of blocks kept per stage")
    ap.add_argument("--qat-steps", type=int, default=120, help="QAT optimiser steps")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=60, help="interleaved timing rounds per batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant.json"))
    a = ap.parse_args()


    from kdtoolkit.distill.trainer import TrainConfig
    from kdtoolkit.envinfo import environment
    from kdtoolkit.pipeline import CompressConfig, DataConfig, MeasureConfig, compress
    from kdtoolkit.quant.qat import QatConfig
    from kdtoolkit.student.build import StudentConfig

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tar, weights = DATA / "cifar10-jpeg.tar.gz", DATA / "weights" / "resnet56-cifar10-jpeg-ft.th"
    if not tar.exists() or not weights.exists():
        sys.exit(f"needs {tar} and {weights}")
    cfg = CompressConfig(
        model=str(weights), arch="cifar_resnet56",
        data=DataConfig(source=str(tar), mean=MEAN, std=STD, train_limit=a.train_limit, test_limit=a.test_limit, seed=a.seed),
        profile="ort-cpu",
        student=StudentConfig(separable=True, init="svd", depth=a.depth),
        train=TrainConfig(epochs=a.epochs, batch_size=128, lr=0.05, augment="none", seed=a.seed),
        qat=QatConfig(epochs=1, max_steps=a.qat_steps, lr=0.002, seed=a.seed),
        measure=MeasureConfig(batches=[1, 64], iters=a.iters),
    )
    t0 = time.perf_counter()
    run = work / "compress"
    try:
        compress(cfg, run, progress=True)
    except Exception as exc:  # a later stage (e.g. the bundle) failing does not void the quantization figures
        print(f"[bench] warning: compress stopped after its stages: {type(exc).__name__}: {exc}", flush=True)
    compress_s = time.perf_counter() - t0
    from kdtoolkit.artifact import Artifact

    def stage(name: str) -> Artifact:
        return Artifact.load(next(p for p in sorted(run.glob(f"[0-9][0-9]-{name}")) if p.is_dir()))

    qart = stage("quantize")
    fp32 = stage("export").file("model.onnx")
    qat_int8 = qart.file("int8.onnx")
    from kdtoolkit.fsutil import sha256_file

    _KEY["fp32"] = sha256_file(fp32)  # cached sections are reused only for this exact FP32 student
    summary = {"teacher": {"accuracy": stage("teacher").metrics.get("accuracy")},
               "student": {"accuracy_torch": stage("distill").metrics.get("accuracy")}}

    from kdtoolkit.pipeline import Context

    ctx = Context(cfg, run, progress=False)
    splits = ctx.splits
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.quant.ptq import calib_array, quantize_onnx
    from kdtoolkit.quant.schemes import Scheme, scheme_for

    models = work / "models"
    models.mkdir(exist_ok=True)
    x_cal = calib_array(splits, a.calib_size, seed=a.seed)

    def acc(path: Path) -> float:
        return evaluate(make_session(path), splits.test, splits.spec)["accuracy"]

    ours = scheme_for(ctx.profile)

    def ort_default():
        # what a user would do: quantize_static, QDQ, per-channel s8 weights, u8 activations, MinMax, defaults otherwise
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from kdtoolkit.quant.ptq import _Reader, model_input

        p = models / "ort_quantize_static.onnx"
        quantize_static(str(fp32), str(p), _Reader(model_input(fp32)[0], x_cal), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        return {"path": str(p), "accuracy": acc(p)}

    ort_res = section(work, "ort_quantize_static", ort_default)

    def trt_scheme():
        p = models / "tensorrt_scheme_ptq.onnx"
        sch = Scheme("tensorrt", "int8", True, "int8", True, 0, False)
        quantize_onnx(fp32, p, x_cal, sch, method="minmax")
        import onnx

        from kdtoolkit.quant.qdq_rules import qdq_findings

        errs = [f.line() for f in qdq_findings(onnx.load(str(p)), "tensorrt") if f.severity == "error"]
        return {"path": str(p), "accuracy": acc(p), "calib": "minmax", "qdq_rule_errors": errs, "scheme": sch.to_manifest()}

    trt_res = section(work, "tensorrt_scheme", trt_scheme)

    def calib_methods():
        out = {}
        for m in ("minmax", "entropy", "percentile", "mse"):
            p = models / f"ptq_{m}.onnx"
            t = time.perf_counter()
            quantize_onnx(fp32, p, x_cal, ours, method=m)
            out[m] = {"path": str(p), "accuracy": acc(p), "quantize_s": round(time.perf_counter() - t, 1)}
            print(f"[bench]   ptq {m}: {100 * out[m]['accuracy']:.2f} %", flush=True)
        return out

    ptq_res = section(work, "ptq_calibration", calib_methods)

    def accuracies():
        return {"fp32": acc(fp32), "int8_qat": acc(qat_int8)}

    acc_res = section(work, "accuracy", accuracies)

    def latency():
        from kdtoolkit.backends.ort import OrtRunner
        from kdtoolkit.latency.timing import measure

        cands = {"fp32": fp32, "int8_qat": qat_int8, "ort_quantize_static": Path(ort_res["path"]),
                 "tensorrt_scheme": Path(trt_res["path"])}
        runners = [OrtRunner(p, name=n) for n, p in cands.items()]
        try:
            res = measure(runners, [1, 64], warmup=10, iters=a.iters)
        finally:
            for r in runners:
                r.close()
        lat = {n: {str(b): {k: v for k, v in s.items() if k != "samples_ms"} for b, s in per.items()} for n, per in res.items()}
        ratios = {n: {b: lat["fp32"][b]["p50"] / lat[n][b]["p50"] for b in lat[n]} for n in lat}
        ours_vs_ort = {b: lat["ort_quantize_static"][b]["p50"] / lat["int8_qat"][b]["p50"] for b in lat["fp32"]}
        return {"latency_ms": lat, "speedup_vs_fp32": ratios, "int8_qat_speed_vs_ort_quantize_static": ours_vs_ort,
                "note": "speedup = FP32 p50 / candidate p50 (above 1 = faster than FP32); all candidates interleaved in one process"}

    lat_res = section(work, "latency", latency)

    env = environment()
    result = {
        "benchmark": "quant_bench",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu": env.get("cpu"), "platform": platform.platform(), "onnxruntime": env.get("onnxruntime"),
                    "torch": env.get("torch"), "threads": "ORT default (all cores), intra-op spinning off"},
        "seeds": {"data_split": a.seed, "train": a.seed, "calibration": a.seed, "timing_order": 0},
        "setup": {"teacher": "cifar_resnet56 fine-tuned on CIFAR-10 JPEG (shared/data/weights/resnet56-cifar10-jpeg-ft.th)",
                  "student": f"kdtoolkit student: separable convs (SVD init), depth {a.depth}",
                  "distill": f"{a.epochs} epochs KD on a seeded {a.train_limit}-image subset of the training split, batch 128",
                  "qat": f"1 epoch, at most {a.qat_steps} steps, KD loss from the teacher, scales from MSE calibration then trained",
                  "test": f"seeded {a.test_limit}-image subset of the CIFAR-10 JPEG test split",
                  "calibration": f"{a.calib_size} training images", "profile": "ort-cpu",
                  "compress_wall_s": round(compress_s, 1)},
        "teacher_accuracy_torch": summary["teacher"]["accuracy"],
        "student_accuracy_torch": summary["student"].get("accuracy_torch"),
        "accuracy_onnxruntime": {**acc_res, "ort_quantize_static": ort_res["accuracy"], "tensorrt_scheme": trt_res["accuracy"]},
        "int8_qat_drop_points": 100 * (acc_res["fp32"] - acc_res["int8_qat"]),
        "ptq_calibration_accuracy": {k: v["accuracy"] for k, v in ptq_res.items() if not k.startswith("_")},
        "tensorrt_scheme_qdq_rule_errors": trt_res["qdq_rule_errors"],
        **{k: v for k, v in lat_res.items() if not k.startswith("_")},
        "auto_decision": {"precision": qart.metrics.get("precision"), "reason": qart.metrics.get("precision_reason"),
                          "int8_speedup_measured_in_stage": qart.metrics.get("int8_speedup"),
                          "kept_in_float": qart.metrics.get("kept_in_float")},
        "stage_wall_s": {"compress (all stages, resumed ones skipped)": round(compress_s, 1)},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("accuracy_onnxruntime", "ptq_calibration_accuracy", "speedup_vs_fp32", "auto_decision")},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
