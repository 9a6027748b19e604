#!/usr/bin/env python3
"""Classify an image or a folder of images with a kdtoolkit bundle, using only numpy, pillow and onnxruntime.

Everything the model needs (input name and size, colour mode, mean/std, layout, class labels,
batch limit) is read from the bundle's manifest.json; nothing from kdtoolkit or torch is used.

    python infer_onnx.py BUNDLE IMAGE_OR_FOLDER [--json] [--batch N] [--threads N] [--on-bad-image skip]

Prints one line per image: path, label, score (softmax probability of the top class).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SUPPORTED_SCHEMA = 1


def load_manifest(bundle: Path) -> dict:
    path = bundle / "manifest.json"
    if not path.is_file():
        sys.exit(f"error: {bundle} is not a kdtoolkit bundle (no manifest.json)")
    m = json.loads(path.read_text())
    if int(m.get("schema_version", 0)) > SUPPORTED_SCHEMA:
        sys.exit(f"error: bundle schema version {m['schema_version']} is newer than this script supports ({SUPPORTED_SCHEMA})")
    return m


def preprocess(path: Path, pre: dict) -> np.ndarray:
    """Image file -> float32 CHW (or HWC), exactly as the manifest says: convert, resize, scale, normalise."""
    h, w = pre["input_size"]
    with Image.open(path) as im:
        im = im.convert(pre["color"])
        if (im.height, im.width) != (h, w):
            im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    x = a.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return x.transpose(2, 0, 1) if pre["layout"] == "NCHW" else x


def preprocess_chunk(files: list[Path], pre: dict, on_bad_image: str = "fail") -> tuple[list[Path], np.ndarray | None]:
    """Preprocess a batch of files; an unreadable one stops with one line naming it, or is left out with a note
    on stderr (``skip``). Returns the files kept and their batch (None when none was readable)."""
    kept, xs = [], []
    for f in files:
        try:
            xs.append(preprocess(f, pre))
        except Exception as exc:  # PIL raises OSError, SyntaxError (a broken PNG chunk), DecompressionBombError...
            if on_bad_image != "skip":
                sys.exit(f"error: {f}: cannot read image ({type(exc).__name__}); pass --on-bad-image skip to leave such files out")
            print(f"skipped: {f}: cannot read image ({type(exc).__name__})", file=sys.stderr)
            continue
        kept.append(f)
    return kept, (np.stack(xs) if xs else None)


def list_images(target: Path) -> list[Path]:
    if target.is_file():
        return [target]
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXT)
    sys.exit(f"error: not found: {target}")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, help="bundle folder (holds manifest.json)")
    ap.add_argument("images", type=Path, help="an image file or a folder of images")
    ap.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    ap.add_argument("--batch", type=int, default=0, help="images per run (default: the profile's largest batch)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    ap.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail", help="an unreadable file stops the run, or is left out")
    args = ap.parse_args(argv)

    m = load_manifest(args.bundle)
    pre, classes = m["preprocessing"], m["classes"]
    inp = m["inputs"][0]
    static = isinstance(inp["shape"][0], int)
    batch = inp["shape"][0] if static else (args.batch or m["profile"]["batch"]["max"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(args.bundle / m["runtime"]["onnx"]), sess_options=so, providers=["CPUExecutionProvider"])
    out_name = m["outputs"][0]["name"]

    files = list_images(args.images)
    results = []
    for i in range(0, len(files), batch):
        chunk, x = preprocess_chunk(files[i:i + batch], pre, args.on_bad_image)
        if x is None:
            continue
        n = len(chunk)
        if static and n < batch:  # a fixed-batch model: pad, then drop the padding
            x = np.concatenate([x, np.zeros((batch - n, *x.shape[1:]), np.float32)])
        logits = sess.run([out_name], {inp["name"]: x})[0][:n]
        prob = softmax(logits.astype(np.float64))
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
