#!/usr/bin/env python3
"""Classify an image or a folder with a kdtoolkit bundle's TensorRT engine (numpy + pillow + tensorrt + cuda-python or pycuda).

Reads everything from the bundle's manifest.json, like infer_onnx.py. Written against the
TensorRT 8.5 to 11 public API with named tensors (set_input_shape, set_tensor_address,
execute_async_v3), through trt_device.py beside it; device memory through pycuda or cuda-python,
whichever works here (a cuda-python newer than the driver's CUDA major is skipped with the reason,
not tried blindly; ``--cuda`` or KDTOOLKIT_CUDA_BACKEND picks one).

    python infer_tensorrt.py BUNDLE IMAGE_OR_FOLDER [--engine model/model.plan] [--json] [--cuda pycuda|cuda-python] [--on-bad-image skip]

The engine must have been built on this device (bash build_on_device.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_onnx import list_images, load_manifest, preprocess_chunk, softmax  # noqa: E402  (numpy + pillow only)


def load_runner(plan: Path, cuda: str | None = None):
    """The engine on this device through trt_device: a CUDA binding that fits the driver, errors in one line."""
    import trt_device as td

    try:
        trt = td.import_tensorrt()
        return td.EngineRunner(trt, plan.read_bytes(), td.cuda_adapter(cuda))
    except td.DeviceError as exc:
        sys.exit(f"error: {exc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--engine", default=None, help="plan file relative to the bundle (default: the manifest's, else model/model.plan)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--cuda", choices=["pycuda", "cuda-python"], default=None, help="CUDA binding (default: the first that works)")
    ap.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail", help="an unreadable file stops the run, or is left out")
    args = ap.parse_args(argv)

    m = load_manifest(args.bundle)
    plan = args.bundle / (args.engine or m["runtime"].get("engine") or "model/model.plan")
    if not plan.is_file():
        sys.exit(f"error: no engine at {plan}; build it on this device first: bash {args.bundle / 'build_on_device.sh'}")
    pre, classes = m["preprocessing"], m["classes"]
    inp = m["inputs"][0]
    static = isinstance(inp["shape"][0], int)
    batch = inp["shape"][0] if static else (args.batch or m["profile"]["batch"]["max"])
    runner = load_runner(plan, args.cuda)
    out_name = m["outputs"][0]["name"]
    results = []
    files = list_images(args.images)
    for i in range(0, len(files), batch):
        chunk, x = preprocess_chunk(files[i:i + batch], pre, args.on_bad_image)
        if x is None:
            continue
        n = len(chunk)
        if static and n < batch:
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), np.float32)])
        outs = runner(x)
        logits = (outs.get(out_name) if out_name in outs else next(iter(outs.values())))[:n].astype(np.float64)
        prob = softmax(logits)
        for f, z, p in zip(chunk, logits, prob):
            k = int(np.argmax(z))
            results.append({"path": str(f), "index": k, "label": classes[k], "score": float(p[k])})
    if not results:
        sys.exit(f"error: no readable image in {args.images}")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}\t{r['label']}\t{r['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
