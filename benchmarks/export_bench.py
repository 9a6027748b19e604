"""Export figures (issue 6): FP32 parity of the exported ResNet-56 on the whole CIFAR-10 JPEG test
set (top-1 agreement with PyTorch, max abs logit difference) and export + simplification time.

    python benchmarks/export_bench.py
"""

from __future__ import annotations

import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "export.json"


def main() -> None:
    data = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    weights = REPO.parent / "shared" / "data" / "weights" / "resnet56-cifar10-jpeg-ft.th"
    for p in (data, weights):
        if not p.exists():
            sys.exit(f"missing {p}: the shared data folder must sit beside the checkout")
    from kdtoolkit import fsutil
    from kdtoolkit.data import load_data
    from kdtoolkit.envinfo import environment
    from kdtoolkit.export.onnx_export import export_onnx, opset_of, parity, simplify
    from kdtoolkit.models import load_model

    model = load_model(weights, arch="cifar_resnet56").module
    splits = load_data(str(data), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with tempfile.TemporaryDirectory() as tmp:
        raw, slim = Path(tmp) / "raw.onnx", Path(tmp) / "model.onnx"
        t0 = time.perf_counter()
        export_onnx(model, (1, 3, 32, 32), raw)  # includes onnx.checker + strict shape inference
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        simp = simplify(raw, slim)
        t_simplify = time.perf_counter() - t0
        par = parity(model, slim, splits.test, splits.spec, limit=None)
        opset = opset_of(slim)
    res = {
        "command": "python benchmarks/export_bench.py",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": environment()["cpu"],
        "model": "cifar_resnet56 (fine-tuned on CIFAR-10 JPEG)",
        "opset": opset,
        "export_s": t_export,
        "simplify_s": t_simplify,
        "simplify": simp,
        "parity_test_set": par,
    }
    fsutil.write_json(OUT, res)
    print(f"export {t_export:.2f} s (with checker + shape inference), simplify {t_simplify:.2f} s, nodes {simp['nodes_before']} -> {simp['nodes_after']}, opset {opset}")
    print(f"parity on {par['n']} test images: top-1 agreement {100 * par['top1_agreement']:.3f} %, max |logit diff| {par['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
