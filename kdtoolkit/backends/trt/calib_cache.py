"""Q/DQ scales -> a TensorRT calibration cache plus the FP32 graph it belongs to, written off the device.

Why: DLA below TensorRT 11 takes INT8 only implicitly (from a calibrator or its cache), never from
Q/DQ nodes. The QAT or PTQ scales are already in the Q/DQ ONNX, so instead of recalibrating on the
device we do what NVIDIA's qdq-translator does: strip the Q/DQ nodes (the weights keep their
fake-quantized values, TensorRT re-derives per-channel weight scales from them) and write each
activation scale into the cache under the name the tensor has in the stripped graph, which is the
name TensorRT's ONNX parser gives it.

The cache is TensorRT's text format, as ``IInt8EntropyCalibrator2::writeCalibrationCache`` writes it
and trtexec ``--calib=FILE`` / kdtoolkit's calibrator read it::

    TRT-8500-EntropyCalibration2
    input: 3c010204
    /features.2/Relu_output_0: 3d4ccccd

one line per tensor, the value the IEEE-754 float32 scale (amax / 127) as 8 hex digits, big endian.
The header number is NV_TENSORRT_VERSION of the release the cache is written for.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit import fsutil
from kdtoolkit.errors import InputError

CACHE_NAME = "calibration.cache"
STRIPPED_NAME = "model_noqdq.onnx"
ALGORITHM = "EntropyCalibration2"
# ops whose output range is their input's (or a subset of it, clipped at 0): a scale known on one
# side holds on the other, so layers between two Q/DQ pairs need not fall back to FP16
SCALE_PRESERVING = frozenset({"Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def _scalar(arr: np.ndarray, what: str) -> float:
    a = np.asarray(arr, dtype=np.float64).reshape(-1)
    if a.size != 1:
        raise InputError(f"{what}: an activation scale must be per tensor (one value) to go into a calibration cache, got {a.size}")
    return float(a[0])


def _dequantize(q: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, per tensor or along ``axis``."""
    q = np.asarray(q).astype(np.float32)
    s = np.asarray(scale, dtype=np.float32)
    z = np.zeros_like(s) if zp is None else np.asarray(zp).astype(np.float32)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * q.ndim
        shape[axis] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    return ((q - z) * s).astype(np.float32)


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear (round half to even, saturate to the zero point's integer type)."""
    s = np.asarray(scale, dtype=np.float32)
    zdt = np.asarray(zp).dtype if zp is not None else np.dtype(np.uint8)
    z = np.zeros_like(s) if zp is None else np.asarray(zp).astype(np.float32)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * x.ndim
        shape[axis] = s.size
        s, z = s.reshape(shape), z.reshape(shape)
    info = np.iinfo(zdt)
    return np.clip(np.round(np.asarray(x, dtype=np.float32) / s) + z, info.min, info.max).astype(zdt)


def strip_qdq(model: Any) -> tuple[Any, dict[str, float], dict[str, Any]]:
    """(FP32 model without Q/DQ, activation scale per tensor name, what was done); InputError where it cannot.

    Activations: a Q -> DQ pair on tensor ``x`` is removed, its consumers read ``x`` again and ``x``'s
    scale is recorded (the larger one when ``x`` is quantized twice). Weights: the DQ output becomes an
    FP32 initializer holding the dequantized (fake-quantized) values under the DQ output's name.
    """
    import copy

    from onnx import helper, numpy_helper

    from kdtoolkit.quant.qdq_rules import _attr, constants

    m = copy.deepcopy(model)
    g = m.graph
    consts = constants(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rename: dict[str, str] = {}
    scales: dict[str, float] = {}
    new_inits: list[Any] = []
    removed: set[int] = set()
    n_weights = 0

    def zp_of(node: Any) -> np.ndarray | None:
        return consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None

    for n in g.node:
        if n.op_type == "QuantizeLinear":
            x = n.input[0]
            if n.input[1] not in consts:
                raise InputError(f"QuantizeLinear {n.name or n.output[0]}: its scale is computed at run time; a calibration cache needs constant scales")
            users = consumers.get(n.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users) or n.output[0] in {o.name for o in g.output}:
                raise InputError(f"QuantizeLinear {n.name or n.output[0]} does not feed only DequantizeLinear nodes; "
                                 "only Q/DQ pairs can be stripped into a calibration cache")
            removed.add(id(n))
            axis = int(_attr(n, "axis", 1))
            if x in consts:  # a weight fake-quantized in the graph: keep its quantized values in FP32
                w = _dequantize(_quantize(consts[x], consts[n.input[1]], zp_of(n), axis), consts[n.input[1]], zp_of(n), axis)
                for dq in users:
                    new_inits.append(numpy_helper.from_array(w, dq.output[0]))
                    removed.add(id(dq))
                    n_weights += 1
                continue
            s = _scalar(consts[n.input[1]], f"QuantizeLinear {n.name or n.output[0]}")
            if s <= 0 or not np.isfinite(s):
                raise InputError(f"QuantizeLinear {n.name or n.output[0]}: scale must be a positive finite number, got {s}")
            scales[x] = max(scales.get(x, 0.0), s)
            for dq in users:
                rename[dq.output[0]] = x
                removed.add(id(dq))
        elif n.op_type == "DequantizeLinear":
            src = producer.get(n.input[0])
            if src is not None and src.op_type == "QuantizeLinear":
                continue  # handled with its Q
            if n.input[0] not in consts or n.input[1] not in consts:
                raise InputError(f"DequantizeLinear {n.name or n.output[0]} reads neither a QuantizeLinear nor a constant; cannot strip it")
            w = _dequantize(consts[n.input[0]], consts[n.input[1]], zp_of(n), int(_attr(n, "axis", 1)))
            new_inits.append(numpy_helper.from_array(w, n.output[0]))
            removed.add(id(n))
            n_weights += 1

    def resolve(name: str) -> str:
        seen = set()
        while name in rename and name not in seen:
            seen.add(name)
            name = rename[name]
        return name

    kept = [n for n in g.node if id(n) not in removed]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = resolve(name)
    extra = []
    for out in g.output:
        if out.name in rename:  # a graph output read through a DQ keeps its name through an Identity
            extra.append(helper.make_node("Identity", [resolve(out.name)], [out.name], name=f"{out.name}/kdt_identity"))
    kept += extra
    g.initializer.extend(new_inits)
    # drop what only fed the Q/DQ nodes (scale and zero-point constants, int8 weights)
    while True:
        used = {i for n in kept for i in n.input} | {o.name for o in g.output}
        dead = [n for n in kept if n.op_type == "Constant" and not any(o in used for o in n.output)]
        if not dead:
            break
        kept = [n for n in kept if n not in dead]
    used = {i for n in kept for i in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    init_names = {t.name for t in inits}
    graph_inputs = [i for i in g.input if i.name in used or i.name not in init_names and i.name not in consts]
    del g.input[:]
    g.input.extend(graph_inputs)
    del g.node[:]
    g.node.extend(kept)
    alive = {o for n in kept for o in n.output} | {i.name for i in g.input}
    vis = [v for v in g.value_info if v.name in alive]
    del g.value_info[:]
    g.value_info.extend(vis)

    # carry scales across ops that keep the range (what qdq-translator's adjacent-scale inference does)
    propagated = 0
    const_names = set(init_names) | set(consts)
    changed = True
    while changed:
        changed = False
        for n in kept:
            if n.op_type not in SCALE_PRESERVING or not n.input or not n.output or n.input[0] in const_names:
                continue
            a, b = n.input[0], n.output[0]
            if a in scales and b not in scales:
                scales[b], changed = scales[a], True
                propagated += 1
            elif b in scales and a not in scales:
                scales[a], changed = scales[b], True
                propagated += 1
    info = {"activation_scales": len(scales), "propagated": propagated, "weights_dequantized": n_weights,
            "qdq_nodes_removed": len(removed)}
    return m, scales, info


def cache_text(scales: dict[str, float], tensorrt_version: str) -> str:
    """The cache file's text for ``scales`` (tensor name -> float32 scale), header for ``tensorrt_version``."""
    from kdtoolkit.backends.trt.version import trt_version_number

    lines = [f"TRT-{trt_version_number(tensorrt_version)}-{ALGORITHM}"]
    for name, s in scales.items():
        if ":" in name and name.rsplit(":", 1)[1].strip() == "":
            raise InputError(f"tensor name {name!r} cannot be written into a calibration cache")
        lines.append(f"{name}: {struct.pack('>f', float(s)).hex()}")
    return "\n".join(lines) + "\n"


def read_calibration_cache(path: str | os.PathLike[str]) -> tuple[str, dict[str, float]]:
    """(header, tensor name -> scale) of a TensorRT calibration cache; InputError for anything else."""
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read the calibration cache ({exc})") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-") or "Calibration" not in lines[0]:
        raise InputError(f"{p}: not a TensorRT calibration cache (expected a first line like TRT-8500-{ALGORITHM})")
    out: dict[str, float] = {}
    for ln in lines[1:]:
        name, sep, hexval = ln.rpartition(": ")
        try:
            if not sep or len(hexval.strip()) > 8:
                raise ValueError(ln)
            out[name] = struct.unpack(">f", bytes.fromhex(hexval.strip().rjust(8, "0")))[0]
        except ValueError:
            raise InputError(f"{p}: bad calibration cache line {ln[:80]!r} (expected 'tensor: 8 hex digits')") from None
    return lines[0], out


def write_calibration_cache_from_qdq(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                                     stripped_path: str | os.PathLike[str] | None = None, *,
                                     tensorrt_version: str = "8.5") -> dict[str, Any]:
    """Write ``out_path`` (calibration cache) and the Q/DQ-free FP32 ONNX it goes with (default: beside it)."""
    import onnx

    src = Path(onnx_path)
    model = onnx.load(str(src))
    stripped, scales, info = strip_qdq(model)
    if not scales:
        raise InputError(f"{src}: no activation Q/DQ pair found, so no scales for a calibration cache")
    try:
        onnx.checker.check_model(stripped)
    except Exception as exc:  # a bug of ours, not the user's input: say what broke
        raise InputError(f"{src}: the graph without Q/DQ does not check ({str(exc).splitlines()[0][:200]})") from None
    dst = Path(stripped_path) if stripped_path is not None else Path(out_path).with_name(STRIPPED_NAME)
    with fsutil.atomic_path(dst, suffix=".onnx") as tmp:
        onnx.save(stripped, str(tmp))
    fsutil.write_text(out_path, cache_text(scales, tensorrt_version))
    return {**info, "cache": Path(out_path).name, "onnx": dst.name, "tensorrt_version": tensorrt_version,
            "format": f"TRT-<NV_TENSORRT_VERSION>-{ALGORITHM}, '<tensor>: <float32 scale, big-endian hex>' per line",
            "source": "the Q/DQ scales of the ONNX (QAT/PTQ), as NVIDIA's qdq-translator turns them into a cache"}
