#!/usr/bin/env python3
"""Build or load the bundle's TensorRT engine ON THE DEVICE, check it, time it, and write device_report.json beside the manifest.

The figures a bundle made off the device could not measure, measured where they belong: the engine's
outputs on the bundle's reference batch against the ONNX Runtime outputs kdtoolkit recorded, top-1 on
data given here (``--data``) next to the ONNX Runtime proxy figure of the run, and latency. The report
is dated and hashed and names the engine (sha256), TensorRT, JetPack/L4T, GPU and power mode, so
``kdtoolkit verify`` can check it and ``kdtoolkit gate`` can use it as a stored side.

Needs only numpy, tensorrt and a CUDA binding (pycuda or cuda-python); pillow only for an image folder
given as --data. Runs on Python 3.8 (JetPack 5). Nothing here estimates: a figure that was not
measured is not written.

    python3 deploy/device_report.py BUNDLE [--engine PLAN | --rebuild] [--data DIR_OR_NPZ] [--iters 500]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys

import numpy as np

SCHEMA = "kdtoolkit.device-report/1"
REPORT_NAME = "device_report.json"
TOLERANCE = {"fp32": {"atol": 1e-3, "rtol": 1e-3}, "fp16": {"atol": 5e-2, "rtol": 5e-2}, "int8": {"atol": 0.25, "rtol": 0.05}}


# ---------------------------------------------------------------------------------------- pure helpers (tested off the device)

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="the bundle folder (manifest.json)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--engine", default=None, help="an engine built earlier on this device (default: model/model.plan if present)")
    src.add_argument("--rebuild", action="store_true", help="build the engine from the bundle even if model/model.plan exists")
    ap.add_argument("--data", default=None, help="test data on this device for top-1: an ImageFolder (class sub-folders) or .npz with x, y "
                                                 "(default: the bundle's testset/test.npz when it was bundled with --test-subset)")
    ap.add_argument("--limit", type=int, default=0, help="use at most this many --data images (0 = all)")
    ap.add_argument("--iters", type=int, default=500, help="timed runs per batch size")
    ap.add_argument("--warmup", type=int, default=50, help="untimed runs per batch size first")
    ap.add_argument("--batch", type=int, action="append", default=None, help="batch size to time (repeatable; default: profile opt and max)")
    ap.add_argument("--out", default=None, help="report path (default: BUNDLE/%s)" % REPORT_NAME)
    ap.add_argument("--cuda", choices=["pycuda", "cuda-python"], default=None, help="CUDA binding to use (default: the first that works)")
    a = ap.parse_args(argv)
    if a.iters < 5:
        ap.error("--iters must be at least 5 (a statistical test needs samples), got %d" % a.iters)
    if a.warmup < 0 or a.limit < 0:
        ap.error("--warmup and --limit must be >= 0")
    if a.batch and any(b < 1 for b in a.batch):
        ap.error("--batch must be >= 1")
    return a


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(doc: dict) -> bytes:
    """The bytes the report's own sha256 covers: the JSON without its 'sha256' key, keys sorted, no spaces."""
    body = dict((k, v) for k, v in doc.items() if k != "sha256")
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def report_sha256(doc: dict) -> str:
    return hashlib.sha256(canonical(doc)).hexdigest()


def parse_l4t(text: str):
    """'# R36 (release), REVISION: 4.0, GCID: ...' (/etc/nv_tegra_release) -> '36.4.0'; None when not that format."""
    import re

    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text or "")
    return "%s.%s.%s" % m.groups() if m else None


# L4T -> JetPack, from NVIDIA's JetPack archive pages (used only when dpkg does not say)
_L4T_JETPACK = {"35.1": "5.0.2", "35.2": "5.1", "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3", "35.6": "5.1.4",
                "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1/6.2"}


def jetpack_from_l4t(l4t):
    if not l4t:
        return None
    return _L4T_JETPACK.get(".".join(l4t.split(".")[:2]))


def parse_nvpmodel(text: str):
    """`nvpmodel -q` output ('NV Power Mode: MAXN' then the id) -> {'name': 'MAXN', 'id': 0}; None when absent."""
    name, mode_id = None, None
    for line in (text or "").splitlines():
        line = line.strip()
        if line.startswith("NV Power Mode:"):
            name = line.split(":", 1)[1].strip()
        elif line.isdigit() and mode_id is None:
            mode_id = int(line)
    if name is None:
        return None
    return {"name": name, "id": mode_id}


def latency_stats(samples):
    a = np.asarray(samples, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "min": float(a.min()), "n": int(a.size)}


def compare_outputs(got: np.ndarray, want: np.ndarray, tol: dict) -> dict:
    """Engine outputs against kdtoolkit's ONNX Runtime outputs for the same reference batch."""
    got = np.asarray(got, dtype=np.float32)
    want = np.asarray(want, dtype=np.float32)
    if got.shape != want.shape:
        return {"passed": False, "why": "shape %s differs from the expected %s" % (list(got.shape), list(want.shape))}
    agree = int((got.argmax(1) == want.argmax(1)).sum())
    close = bool(np.allclose(got, want, atol=tol["atol"], rtol=tol["rtol"]))
    return {"passed": close and agree == len(got), "allclose": close, "max_abs_diff": float(np.max(np.abs(got - want))) if got.size else 0.0,
            "top1_agree": agree, "n": int(len(got)), "tolerance": dict(tol)}


def batches_for(n: int, lo: int, hi: int, static: bool):
    """(start, stop, padded size) chunks covering n rows within the engine's batch range (a static engine takes exactly hi)."""
    size = hi if static else max(lo, min(hi, n))
    out = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        out.append((start, stop, size if static else max(lo, stop - start)))
    return out


def run_batched(run, x: np.ndarray, lo: int, hi: int, static: bool) -> np.ndarray:
    """Feed ``x`` through ``run`` (batch -> logits) in chunks the engine takes, padding with zeros where it must."""
    outs = []
    for start, stop, size in batches_for(len(x), lo, hi, static):
        chunk = x[start:stop]
        if len(chunk) < size:
            chunk = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:], chunk.dtype)])
        outs.append(np.asarray(run(chunk))[: stop - start])
    return np.concatenate(outs)


def preprocess_uint8(images: np.ndarray, pre: dict) -> np.ndarray:
    """N,H,W[,C] uint8 images -> N,C,H,W float32 exactly as the manifest's formula says (x = (p/255 - mean)/std)."""
    x = np.asarray(images, dtype=np.float32) * float(pre.get("scale", 1 / 255))
    if x.ndim == 3:
        x = x[..., None]
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 1, 1, -1)
    std = np.asarray(pre["std"], np.float32).reshape(1, 1, 1, -1)
    return np.ascontiguousarray(((x - mean) / std).transpose(0, 3, 1, 2), dtype=np.float32)


def load_data(path: str, manifest: dict, limit: int = 0):
    """(x float32 N,C,H,W, y int64, what) from an .npz (x preprocessed float32 or raw uint8 images, y) or an ImageFolder."""
    pre, classes = manifest["preprocessing"], manifest["classes"]
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise SystemExit("error: %s must hold arrays x and y, has %s" % (path, ", ".join(z.files)))
            x, y = z["x"], z["y"].astype(np.int64)
        if limit:
            x, y = x[:limit], y[:limit]
        x = preprocess_uint8(x, pre) if x.dtype == np.uint8 else np.asarray(x, np.float32)
        return x, y, "npz %s" % os.path.basename(path)
    if not os.path.isdir(path):
        raise SystemExit("error: --data %s is neither a folder nor an .npz" % path)
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("error: an image folder as --data needs pillow (pip install pillow), or give an .npz") from None
    h, w = pre["input_size"]
    files, labels = [], []
    unknown = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and d not in classes)
    if unknown:
        raise SystemExit("error: --data has class folders the bundle does not know: %s" % ", ".join(unknown[:5]))
    for k, c in enumerate(classes):
        d = os.path.join(path, c)
        if os.path.isdir(d):
            for f in sorted(os.listdir(d)):
                if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
                    files.append(os.path.join(d, f))
                    labels.append(k)
    if not files:
        raise SystemExit("error: no images under %s/<class>/ for the bundle's classes" % path)
    if limit:
        files, labels = files[:limit], labels[:limit]
    imgs = []
    for f in files:
        try:
            with Image.open(f) as im:
                imgs.append(np.asarray(im.convert(pre["color"]).resize((w, h), Image.BILINEAR), dtype=np.uint8))
        except Exception as exc:  # PIL raises OSError, SyntaxError (a broken PNG chunk), DecompressionBombError...
            raise SystemExit("error: %s: cannot read image (%s); remove it from the folder" % (f, type(exc).__name__)) from None
    return preprocess_uint8(np.stack(imgs), pre), np.asarray(labels, np.int64), "ImageFolder %s" % os.path.basename(os.path.abspath(path))


def build_settings(manifest: dict) -> dict:
    """How to build this bundle's engine: the manifest's on_device.build (written by kdtoolkit), else derived from its profile."""
    od = manifest.get("on_device") or {}
    if od.get("build"):
        return dict(od["build"])
    prof = manifest["profile"]
    t = prof.get("tensorrt") or {}
    qdq = bool((manifest.get("model") or {}).get("qdq"))
    prec = prof.get("precision", "fp16")
    if prec == "auto":
        prec = "int8" if qdq else "fp16"
    inp = manifest["inputs"][0]
    b = prof["batch"]
    shapes = None
    if not isinstance(inp["shape"][0], int):
        rest = list(inp["shape"][1:])
        shapes = {inp["name"]: {"min": [b["min"]] + rest, "opt": [b["opt"]] + rest, "max": [b["max"]] + rest}}
    return {"onnx": (manifest.get("runtime") or {}).get("onnx") or "model/model.onnx", "precision": prec, "qdq": qdq,
            "calibration_cache": None, "dla_core": t.get("dla_core"), "gpu_fallback": t.get("gpu_fallback", True),
            "workspace_mb": t.get("workspace_mb", 1024), "shapes": shapes}


def check_bundle_files(root: str, manifest: dict, rels) -> list:
    """The bundle files this run reads must hash as the manifest says; returns the problems."""
    problems = []
    for rel in rels:
        entry = (manifest.get("files") or {}).get(rel)
        p = os.path.join(root, rel)
        if entry is None:
            problems.append("%s is not listed in the manifest" % rel)
        elif not os.path.isfile(p):
            problems.append("%s is missing" % rel)
        elif sha256_file(p) != entry.get("sha256"):
            problems.append("%s differs from the manifest (sha256)" % rel)
    return problems


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w") as fh:
        fh.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _cmd(args) -> str:
    try:
        return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(trt, device_name: str, capability, binding: str) -> dict:
    """What this device is: GPU, TensorRT, CUDA binding, and on a Jetson L4T, JetPack and power mode (as the tools say)."""
    l4t = parse_l4t(_read("/etc/nv_tegra_release"))
    jetson = None
    if l4t:
        jp = _cmd(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]).strip()
        power = parse_nvpmodel(_cmd(["nvpmodel", "-q"]))
        jetson = {"l4t": l4t, "jetpack": jp or jetpack_from_l4t(l4t), "jetpack_source": "dpkg nvidia-jetpack" if jp else "L4T table",
                  "power_mode": power["name"] if power else None, "power_mode_id": power["id"] if power else None,
                  "model": _read("/proc/device-tree/model").strip("\0\n ") or None}
    return {"gpu": device_name, "compute_capability": "%d.%d" % tuple(capability), "tensorrt": str(trt.__version__),
            "cuda_binding": binding, "jetson": jetson, "python": platform.python_version(), "machine": platform.machine(),
            "platform": platform.platform()}


# ---------------------------------------------------------------------------------------- main (needs TensorRT)

def main(argv=None) -> int:
    a = parse_args(argv)
    root = os.path.abspath(a.bundle)
    mpath = os.path.join(root, "manifest.json")
    if not os.path.isfile(mpath):
        sys.stderr.write("error: %s is not a kdtoolkit bundle (no manifest.json)\n" % root)
        return 2
    with open(mpath) as fh:
        m = json.load(fh)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trt_device as td

    try:
        return _run(a, root, mpath, m, td)
    except td.DeviceError as exc:
        sys.stderr.write("error: %s\n" % exc)
        return 1


def _run(a, root, mpath, m, td) -> int:
    ref = m["reference"]
    build = build_settings(m)
    needed = [ref["input"], ref["expected"]]
    plan_rel = "model/model.plan"
    trt = td.import_tensorrt()
    cuda = td.cuda_adapter(a.cuda)
    name, cap = cuda.device()
    if a.engine:
        plan_path, built_here = os.path.abspath(a.engine), False
    elif os.path.isfile(os.path.join(root, plan_rel)) and not a.rebuild:
        plan_path, built_here = os.path.join(root, plan_rel), False
    else:
        needed += [build["onnx"]] + ([build["calibration_cache"]] if build.get("calibration_cache") else [])
        problems = check_bundle_files(root, m, needed)
        if problems:
            raise td.DeviceError("the bundle does not match its manifest: " + "; ".join(problems))
        cache = os.path.join(root, build["calibration_cache"]) if build.get("calibration_cache") else None
        plan = td.build_plan(trt, os.path.join(root, build["onnx"]), dict(build, calibration_cache=cache), log=td.stderr)
        plan_path, built_here = os.path.join(root, plan_rel), True
        tmp = plan_path + ".tmp-%d" % os.getpid()
        with open(tmp, "wb") as fh:
            fh.write(plan)
        os.replace(tmp, plan_path)
    problems = check_bundle_files(root, m, [ref["input"], ref["expected"]])
    if problems:
        raise td.DeviceError("the bundle does not match its manifest: " + "; ".join(problems))
    with open(plan_path, "rb") as fh:
        plan = fh.read()
    runner = td.EngineRunner(trt, plan, cuda)
    try:
        lo, hi = runner.batch_range()
        static = lo == hi
        out_name = m["outputs"][0]["name"]

        def logits(x):
            outs = runner(x)
            return outs[out_name] if out_name in outs else next(iter(outs.values()))

        x_ref = np.load(os.path.join(root, ref["input"]), allow_pickle=False)
        want = np.load(os.path.join(root, ref["expected"]), allow_pickle=False)
        precision = build.get("precision") or m["model"].get("precision", "fp32")
        tol = ref.get("tolerance_engine") or TOLERANCE.get(precision, TOLERANCE["int8"])
        reference = compare_outputs(run_batched(logits, x_ref, lo, hi, static), want, tol)
        reference["against"] = "reference/expected.npy: kdtoolkit's ONNX Runtime outputs of model/model.onnx"
        accuracy = None
        subset = m.get("test_subset") or {}
        data = a.data or (os.path.join(root, subset["path"]) if subset.get("path") else None)
        if data:
            x, y, what = load_data(data, m, a.limit)
            pred = run_batched(logits, x, lo, hi, static).argmax(1)
            proxy = (m.get("metrics") or {}).get("accuracy") or {}
            accuracy = {"top1": float((pred == y).mean()), "n": int(len(y)), "data": what,
                        "onnxruntime_proxy_top1": proxy.get("value"), "onnxruntime_proxy_n": proxy.get("n_test"),
                        "note": "the proxy figure is the run's ONNX Runtime CPU accuracy on its own test split; "
                                "compare like for like only when --data is that split"}
            if not a.data and not a.limit:  # the bundled subset: ONNX Runtime's top-1 on exactly these images
                accuracy.update({"onnxruntime_proxy_top1": subset.get("onnxruntime_top1"), "onnxruntime_proxy_n": subset.get("images"),
                                 "note": "bundled test subset: the proxy figure is ONNX Runtime CPU on exactly these images"})
        batches = sorted(set(a.batch or ([hi] if static else [m["profile"]["batch"]["opt"], m["profile"]["batch"]["max"]])))
        shape = list(x_ref.shape[1:])
        latency = {}
        for b in batches:
            if not lo <= b <= hi:
                raise td.DeviceError("batch %d is outside the engine's range %d..%d" % (b, lo, hi))
            xb = np.zeros([b] + shape, np.float32)
            xb[: min(b, len(x_ref))] = x_ref[: min(b, len(x_ref))]
            samples = runner.time_batch(xb, a.iters, a.warmup)
            st = latency_stats(samples)
            st["throughput_per_s"] = b * 1000.0 / st["p50"] if st["p50"] > 0 else None
            st["samples_ms"] = [round(s, 5) for s in samples]
            latency[str(b)] = st
    finally:
        runner.close()
    with open(mpath, "rb") as fh:
        manifest_sha = hashlib.sha256(fh.read()).hexdigest()
    files = m.get("files") or {}
    doc = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "bundle": {"name": m.get("name"), "manifest_sha256": manifest_sha, "profile": m["profile"]["name"],
                   "onnx": build["onnx"], "onnx_sha256": (files.get(build["onnx"]) or {}).get("sha256")},
        "engine": {"file": os.path.relpath(plan_path, root) if plan_path.startswith(root + os.sep) else plan_path,
                   "sha256": td_sha(plan), "bytes": len(plan), "built_here": built_here,
                   "build": build if built_here else None, "batch_range": [lo, hi]},
        "environment": environment(trt, name, cap, cuda.name),
        "reference": reference,
        "accuracy": accuracy,
        "latency_ms": {"runtime": "tensorrt", "what": "execute_async_v3 + stream synchronize, input already on the device",
                       "iters": a.iters, "warmup": a.warmup, "by_batch": latency},
    }
    doc["sha256"] = report_sha256(doc)
    out = a.out or os.path.join(root, REPORT_NAME)
    write_json_atomic(out, doc)
    print("reference outputs: %s (max |diff| %s, top-1 %s/%s agree)" % ("OK" if reference["passed"] else "FAIL",
                                                                        reference.get("max_abs_diff"), reference.get("top1_agree"),
                                                                        reference.get("n")))
    if accuracy:
        print("top-1 on %s: %.2f %% (%d images)" % (accuracy["data"], 100 * accuracy["top1"], accuracy["n"]))
    for b, st in latency.items():
        print("latency batch %s: p50 %.3f ms, p90 %.3f ms" % (b, st["p50"], st["p90"]))
    print("wrote %s" % out)
    return 0 if reference["passed"] else 1


def td_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    sys.exit(main())
