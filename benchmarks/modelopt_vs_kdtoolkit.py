"""kdtoolkit's TensorRT-scheme INT8 QDQ against NVIDIA ModelOpt's ONNX PTQ, same calibration (issue 14, part 1).

    python benchmarks/modelopt_vs_kdtoolkit.py --modelopt-python /path/to/modelopt-venv/bin/python [--onnx extra.onnx ...]

ModelOpt (``nvidia-modelopt[onnx]``) pins onnx 1.21, onnxruntime-gpu and cupy, so it never enters this
project's environment: it lives in a virtual environment of its own (``python3 -m venv V &&
V/bin/pip install 'nvidia-modelopt[onnx]'``) and this script calls it there, on CPU
(``calibration_eps=['cpu']``), with the same 512 seeded calibration images (ImageNet normalisation)
that kdtoolkit's PTQ gets. Both methods each: entropy and max/minmax. Top-1 of every QDQ graph on all
10,000 CIFAR-10 JPEG test images through ONNX Runtime CPU (the proxy for TensorRT's accuracy: TensorRT
itself is not installed here). Models: the shared fine-tuned ResNet-56, and any ``--onnx`` FP32 graph
of the same input (e.g. the headline student). Results go to benchmarks/results/modelopt_vs_kdtoolkit.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import MEAN, STD, shared_teacher_data  # noqa: E402  (benchmarks/ is on the path when a script runs)

MODELOPT = """
import sys, numpy as np
from modelopt.onnx.quantization import quantize
fp32, calib, method, out = sys.argv[1:5]
quantize(fp32, quantize_mode="int8", calibration_data=np.load(calib), calibration_method=method,
         calibration_eps=["cpu"], output_path=out, high_precision_dtype="fp32")
import modelopt; print("modelopt", modelopt.__version__)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modelopt-python", required=True, help="python of the virtual environment that has nvidia-modelopt[onnx]")
    ap.add_argument("--onnx", nargs="*", default=[], help="more FP32 ONNX graphs (3x32x32 input) to compare on")
    ap.add_argument("--work", default=str(ROOT / "runs" / "modelopt_vs_kdtoolkit"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--profile", default="jetson-agx-orin", help="the TensorRT profile whose scheme kdtoolkit quantizes with")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "modelopt_vs_kdtoolkit.json"))
    a = ap.parse_args()
    if not Path(a.modelopt_python).exists():
        sys.exit(f"error: {a.modelopt_python} not found: make ModelOpt's own virtual environment first (see this script's help)")

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

    t0 = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tar, weights = shared_teacher_data()
    torch.manual_seed(0)
    splits = load_data(str(tar), mean=MEAN, std=STD, seed=0)
    calib = work / "calib.npy"
    x_cal = calib_array(splits, a.calib_size, seed=0)
    np.save(calib, x_cal)
    scheme = scheme_for(load_profile(a.profile))
    models: dict[str, Path] = {}
    teacher_fp32 = work / "resnet56" / "fp32.onnx"
    if not teacher_fp32.exists():
        teacher_fp32.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(load_model(str(weights), arch="cifar_resnet56").module.eval(), (1, 3, 32, 32), teacher_fp32.with_suffix(".raw.onnx"))
        simplify(teacher_fp32.with_suffix(".raw.onnx"), teacher_fp32)
    models["resnet56"] = teacher_fp32
    for p in a.onnx:
        models[Path(p).parent.name + "-" + Path(p).stem] = Path(p)

    results: dict[str, Any] = {}
    version = None
    for name, fp32 in models.items():
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        rows: dict[str, Any] = {"fp32": {"path": fp32}}
        for method, ours in (("entropy", "entropy"), ("max", "minmax")):
            mo = d / f"modelopt_{method}.onnx"
            if not mo.exists():
                t = time.perf_counter()
                r = subprocess.run([a.modelopt_python, "-c", MODELOPT, str(fp32), str(calib), method, str(mo)],
                                   capture_output=True, text=True)
                if r.returncode != 0 or not mo.exists():
                    sys.exit(f"error: ModelOpt failed on {name} ({method}): {(r.stderr or r.stdout).strip().splitlines()[-1][:300]}")
                version = version or next((ln.split()[1] for ln in r.stdout.splitlines() if ln.startswith("modelopt ")), None)
                print(f"[bench] {name}: ModelOpt {method} in {time.perf_counter() - t:.0f} s", flush=True)
            rows[f"modelopt_{method}"] = {"path": mo}
            kd = d / f"kdtoolkit_{ours}.onnx"
            if not kd.exists():
                quantize_onnx(fp32, kd, x_cal, scheme, method=ours)
            rows[f"kdtoolkit_{ours}"] = {"path": kd}
        for row, r in rows.items():
            r["top1"] = evaluate(make_session(r["path"]), splits.test, splits.spec)["accuracy"]
            r["path"] = os.path.relpath(r["path"], ROOT)
            print(f"[bench]   {name} {row}: {100 * r['top1']:.2f} %", flush=True)
        results[name] = rows
    if version is None:
        r = subprocess.run([a.modelopt_python, "-c", "import modelopt; print(modelopt.__version__)"], capture_output=True, text=True)
        version = r.stdout.strip() or None
    env = environment()
    doc = {
        "benchmark": "modelopt_vs_kdtoolkit",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], ROOT), "--modelopt-python", "MODELOPT_VENV/bin/python",
                             *[f"--onnx {p}" for p in a.onnx]]),
        "machine": {"cpu": env.get("cpu"), "platform": platform.platform(), "onnxruntime": env.get("onnxruntime")},
        "setup": {"calibration": f"{a.calib_size} seeded training images, ImageNet mean/std, the same array for both tools",
                  "modelopt": f"nvidia-modelopt {version}, modelopt.onnx.quantization.quantize(quantize_mode='int8', "
                              "calibration_eps=['cpu'], high_precision_dtype='fp32'), in its own virtual environment",
                  "kdtoolkit": f"kdtoolkit.quant.ptq.quantize_onnx, scheme {scheme.name} of profile {a.profile}",
                  "accuracy": f"top-1 on all {len(splits.test)} test images, ONNX Runtime CPU (the TensorRT proxy)"},
        "results": results, "wall_s": round(time.perf_counter() - t0, 1),
    }
    fsutil.write_json(Path(a.out), doc)
    for name, rows in results.items():
        print(f"\n{name}")
        for row, r in rows.items():
            print(f"  {row:22s} {100 * r['top1']:6.2f} %")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
