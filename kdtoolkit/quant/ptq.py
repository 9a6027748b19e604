"""Post-training quantization to a QDQ ONNX model, in the profile's scheme.

onnxruntime's ``quantize_static`` does the graph work (QDQ placement, per-channel weights,
reduce_range, symmetric activations through ``extra_options``) and the MinMax and Percentile
calibrations. For ``entropy`` (TensorRT's recipe) and ``mse`` we collect the activations ourselves
(one ORT pass with every candidate tensor as an output) and compute, per tensor, the KL-optimal
threshold or the clipping range whose quantize-dequantize error is smallest; the ranges go back
into ``quantize_static`` as ``TensorQuantOverrides``, so the graph is built by the same code path.
For the ORT schemes the op list is ORT's own, so the Q/DQ placement (and hence ORT's fusions) is
``quantize_static``'s; the one rewrite on top, :func:`align_input_channels`, is exact and only makes
ORT pick its fast kernel for an RGB stem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.config import Int8Config
from kdtoolkit.errors import InputError
from kdtoolkit.progress import log
from kdtoolkit.quant.calib import MIN_CALIB, calib_array, mse_range, qdq_error  # noqa: F401  (re-exported)
from kdtoolkit.quant.schemes import PASS_THROUGH_OPS, Scheme

CALIB_METHODS = ("minmax", "entropy", "percentile", "mse")
_SAMPLE_CAP = 1 << 19  # values kept per tensor for the MSE search (a uniform random subsample)
# ops that only carry shapes or are fine left in float around quantized ops
_BENIGN_OPS = {"Shape", "Gather", "Constant", "Softmax", "Cast", "Mul", "Sub", "Div", "Sigmoid", "ReduceMean",
               "QuantizeLinear", "DequantizeLinear", "BatchNormalization"}


def model_input(path: str | os.PathLike[str]) -> tuple[str, list[Any]]:
    """Name and shape (dims as int or str) of the model's first graph input."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    inp = next(i for i in m.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def check_calib_shape(onnx_path: str | os.PathLike[str], sample_shape: tuple[int, ...]) -> None:
    """Calibration images must be C,H,W of the model input (the data is not silently resized here)."""
    _, dims = model_input(onnx_path)
    want = dims[1:]
    got = list(sample_shape)
    if len(want) != len(got) or any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, got)):
        raise InputError(f"calibration data is {'x'.join(map(str, got))} per sample but the model takes "
                         f"{'x'.join(map(str, want))} (input shape {dims})")


def unquantizable_ops(onnx_path: str | os.PathLike[str], scheme: Scheme) -> list[str]:
    """Op types in the model the scheme cannot quantize: they stay in float (listed for the user)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    ok = set(scheme.quant_ops) | set(PASS_THROUGH_OPS) | _BENIGN_OPS
    return sorted({n.op_type for n in m.graph.node if n.op_type not in ok})


class _Reader:
    """onnxruntime CalibrationDataReader over an in-memory array, in fixed batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32) -> None:
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.x):
            return None
        out = {self.name: self.x[self.i:self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def _collect(fp32: Path, x: np.ndarray, tensors: list[str], batch: int = 64) -> dict[str, np.ndarray]:
    """Run the model once over ``x`` with ``tensors`` as extra outputs; keep a subsample of each."""
    import onnx

    from kdtoolkit.backends.ort import make_session

    m = onnx.load(str(fp32))
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "aug.onnx"
        onnx.save(m, str(p))
        sess = make_session(p, level="basic")
        name = sess.get_inputs()[0].name
        outs = [o.name for o in sess.get_outputs()]
        rng = np.random.default_rng(0)
        acc: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
        nb = -(-len(x) // batch)
        for i in range(0, len(x), batch):
            res = dict(zip(outs, sess.run(None, {name: x[i:i + batch]})))
            for t in tensors:
                v = np.asarray(res[t], np.float32).ravel()
                k = min(len(v), _SAMPLE_CAP // nb + 1)
                # always keep the extremes so the search starts from the true range
                acc[t].append(np.concatenate([rng.choice(v, k, replace=False) if k < len(v) else v, [v.min(), v.max()]]))
    return {t: np.concatenate(a) for t, a in acc.items()}


def _float_tensors(fp32: Path, scheme: Scheme) -> list[str]:
    """Activation tensors (inputs and outputs of quantizable / pass-through ops) that may get Q/DQ."""
    import onnx

    m = onnx.load(str(fp32))
    inits = {i.name for i in m.graph.initializer}
    ops = set(scheme.quant_ops) | set(PASS_THROUGH_OPS)
    names: list[str] = []
    for n in m.graph.node:
        if n.op_type in ops:
            for t in [*n.input, *n.output]:
                if t and t not in inits and t not in names:
                    names.append(t)
    return names


CHANNEL_ALIGN = 4  # MLAS' fast symmetric u8s8 conv (ConvSym) needs input channels in multiples of 4 on x86


def align_input_channels(path: str | os.PathLike[str], multiple: int = CHANNEL_ALIGN) -> list[str]:
    """Zero-pad the input channels of a quantized stem conv (3 -> 4) in a QDQ model, in place.

    Why: ORT's QLinearConv takes its fast symmetric kernel (MLAS ConvSym) only when the input channels
    are a multiple of 4; an RGB stem falls back to a generic path that measured 3-4x slower than the same
    conv in FP32 (1.7 ms against 0.43 ms at batch 64 on 32x32 CIFAR, AVX-512 VNNI, ORT 1.32), enough to make
    a small separable student slower in INT8 than in FP32. The float input is padded with a zero channel
    before its QuantizeLinear and the int8 weight gets a zero input channel: the result is exact (a zero
    channel times a zero weight), scales and zero points are unchanged. Only a Conv fed by
    Q(graph input) -> DQ, with int8 weights, group 1 and nothing else reading that Q/DQ, is rewritten.
    Returns the rewritten conv names."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    graph_inputs = {i.name for i in g.input if i.name not in inits}
    done: list[str] = []
    for n in list(g.node):
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        if next((a.i for a in n.attribute if a.name == "group"), 1) != 1:
            continue
        dq_x, dq_w = prod.get(n.input[0]), prod.get(n.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = prod.get(dq_x.input[0])
        w = inits.get(dq_w.input[0])
        if q_x is None or q_x.op_type != "QuantizeLinear" or q_x.input[0] not in graph_inputs or w is None:
            continue
        if readers.get(q_x.output[0]) != 1 or readers.get(dq_x.output[0]) != 1 or readers.get(dq_w.input[0]) != 1 or readers.get(q_x.input[0]) != 1:
            continue
        wa = numpy_helper.to_array(w)
        c = wa.shape[1]
        if wa.ndim != 4 or wa.dtype != np.int8 or c % multiple == 0 or c > 4 * multiple:
            continue
        extra = multiple - c % multiple
        wa = np.concatenate([wa, np.zeros((wa.shape[0], extra, *wa.shape[2:]), wa.dtype)], axis=1)
        w.CopyFrom(numpy_helper.from_array(wa, w.name))
        pads_name, out_name = f"{n.name or 'conv'}_channel_pads", f"{q_x.input[0]}_channels{c + extra}"
        g.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), pads_name))
        pad = helper.make_node("Pad", [q_x.input[0], pads_name], [out_name], name=f"{n.name or 'conv'}_channel_pad", mode="constant")
        q_x.input[0] = out_name
        g.node.insert(list(g.node).index(q_x), pad)
        # the Q/DQ pair and the weight's DQ now carry the padded channels: drop any recorded shapes of them (an
        # exported or simplified graph may hold them) so shape inference derives the new ones instead of contradicting them
        stale = {q_x.output[0], dq_x.output[0], dq_w.output[0]}
        keep = [vi for vi in g.value_info if vi.name not in stale]
        del g.value_info[:]
        g.value_info.extend(keep)
        done.append(n.name)
    if done:
        from kdtoolkit import fsutil
        from kdtoolkit.export.onnx_export import check_onnx

        with fsutil.atomic_path(path, suffix=".onnx") as tmp:
            onnx.save(m, str(tmp))
            check_onnx(tmp)  # here, not at the next reader: a stale shape once surfaced only when the fallback re-checked
    return done


ENTROPY_BINS, ENTROPY_QUANT_BINS = 2048, 128  # TensorRT's entropy calibration (IInt8EntropyCalibrator2)


def entropy_threshold(values: np.ndarray, bins: int = ENTROPY_BINS, levels: int = ENTROPY_QUANT_BINS) -> float:
    """TensorRT's entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC 2017; IInt8EntropyCalibrator2).

    A histogram of |x| with ``bins`` bins over [0, max|x|] (the zero bin levelled with its neighbour); for every cut i from ``levels`` to ``bins`` the reference P
    is the first i bins with everything above folded into the last, Q is the same i bins merged into ``levels`` levels
    and spread back over their non-empty bins; the cut with the least KL(P || Q) is the threshold. Why our own: ORT's
    EntropyCalibrater searches a window centred on zero of a signed histogram, which gives a ReLU output only half the
    levels and clipped its ranges to 0.25-0.44 of their max (2.4 points lost on ResNet-56,
    benchmarks/results/modelopt_vs_kdtoolkit.json)."""
    a = np.abs(np.asarray(values, np.float64).ravel())
    amax = float(a.max()) if a.size else 0.0
    if amax == 0.0:
        return 0.0
    hist, edges = np.histogram(a, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    hist[0] = hist[1]  # as NVIDIA's pytorch-quantization does: a ReLU's spike of zeros would otherwise decide the cut
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i]: the count in bins i..end
    best, best_kl = bins, np.inf
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        p[-1] += tail[i]  # outliers folded into the last kept bin
        src = hist[:i]
        group = np.arange(i) * levels // i  # which of the ``levels`` merged bins each source bin falls in
        merged = np.bincount(group, weights=src, minlength=levels)
        nonzero = np.bincount(group, weights=(src > 0).astype(np.float64), minlength=levels)
        q = np.where(src > 0, merged[group] / np.maximum(nonzero[group], 1.0), 0.0)
        mask = p > 0
        if not mask.any():
            continue
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
        qm = qs[mask]
        kl = float(np.sum(ps[mask] * np.log(ps[mask] / np.where(qm > 0, qm, 1e-10))))  # an empty Q bin under P costs a lot
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])


def entropy_range(values: np.ndarray, scheme: Scheme) -> tuple[float, float]:
    """(rmin, rmax) from :func:`entropy_threshold` (TensorRT's recipe) for one tensor's calibration values.

    Symmetric schemes (TensorRT) get [-t, t]; asymmetric ones (u8 on ORT) the data's own range clipped to t on each
    side, so a ReLU output keeps [0, t] and all 256 levels."""
    thr = entropy_threshold(values)
    symmetric = bool(scheme.ort_kwargs()["extra_options"].get("ActivationSymmetric", False))
    lo, hi = (-thr, thr) if symmetric else (max(float(values.min()), -thr), min(float(values.max()), thr))
    return min(lo, 0.0), max(hi, 0.0)


# LayerNormalization/InstanceNormalization are in ORT's QDQ registry (float kernels between a DQ and a Q). The
# registry without them (transformer_op_types) is benchmarks/vit_int8.py's "static_transformer_ops" row; it measured
# no faster than ORT's own list, so quantize_onnx keeps ORT's.
_FLOAT_IN_TRANSFORMERS = ("LayerNormalization", "InstanceNormalization", "BatchNormalization")


def is_transformer_graph(path_or_model: Any) -> bool:
    """Whether an ONNX graph holds transformer blocks: a LayerNormalization (or its opset-16 decomposition: ReduceMean
    feeding a Sub), or a Softmax fed by a MatMul of two activations (attention scores)."""
    import onnx

    m = onnx.load(str(path_or_model), load_external_data=False) if not hasattr(path_or_model, "graph") else path_or_model
    inits = {i.name for i in m.graph.initializer}
    consts = {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    prod = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type == "LayerNormalization":
            return True
        if n.op_type == "Softmax":
            src = prod.get(n.input[0])
            while src is not None and src.op_type in ("Div", "Mul", "Add", "Cast"):
                src = prod.get(src.input[0])
            if src is not None and src.op_type == "MatMul" and not any(i in inits or i in consts for i in src.input):
                return True
    return False


def transformer_op_types() -> list[str]:
    """ORT's QDQ registry minus the normalisations: MatMul (both inputs: attention's Q.K^T and P.V run as int8),
    Gemm/Conv weights and the shape ops between them quantized; LayerNorm, Softmax, GELU (Erf) stay float."""
    from onnxruntime.quantization.registry import QDQRegistry

    return [op for op in QDQRegistry if op not in _FLOAT_IN_TRANSFORMERS]


DYNAMIC_OPS = ("MatMul", "Gemm")


def resolve_mode(mode: str, backend: str, fp32: str | os.PathLike[str]) -> tuple[str, str]:
    """The INT8 mode a profile's ``quant.mode`` means for this graph, and why. ``auto``: dynamic for a transformer on
    ONNX Runtime (on a trained cifar_vit: 1.47x / 1.61x of FP32 at batch 1 / 64 and -0.05 points, against static QDQ's
    1.04x / 1.15x and -0.30; benchmarks/results/vit_int8.json), static for everything else and for TensorRT."""
    if mode != "auto":
        return mode, f"quant.mode {mode}"
    if backend == "onnxruntime" and is_transformer_graph(fp32):
        return "dynamic", "auto: a transformer graph on ONNX Runtime (dynamic INT8 measured faster than static QDQ for ViTs)"
    return "static", "auto: static Q/DQ" + (" (TensorRT)" if backend != "onnxruntime" else " (not a transformer graph)")


def quantize_dynamic_onnx(fp32: str | os.PathLike[str], out: str | os.PathLike[str], scheme: Scheme) -> dict[str, Any]:
    """ONNX Runtime's ``quantize_dynamic``: int8 weights for MatMul/Gemm (per output channel), activations quantized at
    run time from each batch's own range (DynamicQuantizeLinear -> MatMulInteger), so there is nothing to calibrate.

    Why offer it: on ORT CPU a transformer is mostly MatMul/Gemm with weights, and the static QDQ graph adds Q/DQ on
    every activation; see benchmarks/results/vit_int8.json for the measured comparison. ORT-only: TensorRT does not
    parse MatMulInteger/DynamicQuantizeLinear."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from kdtoolkit import fsutil
    from kdtoolkit.export.onnx_export import check_onnx

    if scheme.name == "tensorrt":
        raise InputError("dynamic INT8 is for ONNX Runtime CPU targets; TensorRT needs static Q/DQ (drop --int8-mode dynamic)")
    fp32 = Path(fp32)
    check_onnx(fp32)
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    with fsutil.atomic_path(out, suffix=".onnx") as tmp:
        try:
            quantize_dynamic(str(fp32), str(tmp), op_types_to_quantize=list(DYNAMIC_OPS), per_channel=scheme.weight_per_channel,
                             reduce_range=scheme.reduce_range, weight_type=QuantType.QInt8)
        except Exception as exc:
            raise InputError(f"onnxruntime quantize_dynamic failed on {fp32}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        finally:
            root.setLevel(level)
        check_onnx(tmp)
    import onnx

    ops = {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    return {"mode": "dynamic", "op_types": list(DYNAMIC_OPS), "per_channel": scheme.weight_per_channel,
            "reduce_range": scheme.reduce_range, "weights": "int8", "activations": "uint8, range computed per batch at run time",
            "integer_ops": sorted(ops & {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "DynamicQuantizeMatMul"}),
            "calib_samples": 0}


def quantize_onnx(
    fp32: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calib: np.ndarray,
    scheme: Scheme,
    *,
    method: str = "minmax",
    percentile: float = 99.99,
    nodes_to_exclude: list[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the QDQ model of ``fp32`` to ``out``; return what was done (for the manifest)."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    from kdtoolkit import fsutil
    from kdtoolkit.export.onnx_export import check_onnx

    if method not in CALIB_METHODS:
        raise InputError(f"unknown calibration method {method!r} (known: {', '.join(CALIB_METHODS)})")
    fp32 = Path(fp32)
    check_onnx(fp32)
    check_calib_shape(fp32, tuple(calib.shape[1:]))
    name, _ = model_input(fp32)
    kw = scheme.ort_kwargs()
    extra = dict(kw.pop("extra_options"))
    # a transformer keeps ORT's own registry: MatMul (both inputs, so attention's Q.K^T and P.V run as int8), Gemm and the
    # shape ops quantized; Softmax and the GELU's Erf stay float; LayerNorm gets a DQ -> float LN -> Q. Leaving LayerNorm
    # out of the list measured no faster on a trained cifar_vit (benchmarks/results/vit_int8.json: 1.08x/1.09x vs 1.04x/1.15x
    # at batch 1/64; +0.07 vs -0.30 points), and ORT CPU's `auto` mode takes dynamic INT8 for transformers anyway
    transformer = kw["op_types_to_quantize"] is None and is_transformer_graph(fp32)
    cm = CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    info: dict[str, Any] = {"calib_method": method, "calib_samples": int(len(calib)), "scheme": scheme.to_manifest(),
                            "float_ops": unquantizable_ops(fp32, scheme), "nodes_in_float": list(nodes_to_exclude or [])}
    if transformer:
        info["op_types"] = {"list": "ORT's QDQ registry (transformer graph: MatMul with Q/DQ on both inputs)",
                            "float": ["Softmax", "Erf (GELU)", "LayerNormalization (between a DQ and a Q)"],
                            "alternative": "--int8-mode dynamic measured faster for a ViT on ORT CPU (benchmarks/results/vit_int8.json)"}
    if method in ("entropy", "mse"):
        # Ranges we compute, handed to quantize_static as TensorQuantOverrides (with MinMax for anything left): ORT has
        # no MSE calibrator, and its entropy calibrator cannot be reached with TensorRT's settings (quantize_static fixes
        # its bins) and, run directly, searches a signed window; entropy_threshold is TensorRT's recipe.
        tensors = _float_tensors(fp32, scheme)
        log(f"[quantize] {method} calibration over {len(tensors)} tensors", enabled=progress)
        pick = entropy_range if method == "entropy" else mse_range
        extra["TensorQuantOverrides"] = {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                                         for t, (lo, hi) in ((t, pick(v, scheme)) for t, v in _collect(fp32, calib, tensors).items())}
        cm = CalibrationMethod.MinMax
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT logs a "consider pre-processing" warning per call: our export is already simplified
    with fsutil.atomic_path(out, suffix=".onnx") as tmp:
        try:
            quantize_static(str(fp32), str(tmp), _Reader(name, calib), calibrate_method=cm, nodes_to_exclude=nodes_to_exclude or [],
                            extra_options=extra, **kw)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"onnxruntime quantize_static failed on {fp32}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        finally:
            root.setLevel(level)
        if scheme.name == "ort_x86":
            info["channel_aligned_convs"] = align_input_channels(tmp)
        check_onnx(tmp)
    return info


def _tensorrt_rule_check(path: Path) -> list[str]:
    """Run the project's Q/DQ rule check (kdtoolkit.quant.qdq_rules) for the tensorrt scheme; error lines."""
    import onnx

    from kdtoolkit.quant.qdq_rules import qdq_findings

    return [f.line() for f in qdq_findings(onnx.load(str(path)), "tensorrt") if f.severity == "error"]


def build_int8(
    fp32: Path,
    out: Path,
    splits: Any,
    scheme: Scheme,
    config: Int8Config | None = None,
    *,
    student: Any = None,
    teacher: Any = None,
    qat_cfg: Any = None,
    loss: Any = None,
    work: Path | None = None,
    progress: bool = False,
    output_names: list[str] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Make the INT8 QDQ model of ``fp32`` at ``out`` (QAT when ``config.method='qat'`` and a torch student is
    given, else PTQ), measure FP32 and INT8 top-1 on the test split with ORT sessions, and fall back to
    float for the most sensitive layers if INT8 misses the tolerance. Returns info and metrics.

    ``config`` is a :class:`kdtoolkit.config.Int8Config`; its fields may also be given as keywords
    (``calib_size=64``), which override it.

    ``output_names`` (outputs that are not class logits): no top-1; the INT8 outputs are compared with the FP32
    outputs on the test split instead (``output_fidelity``), and the sensitivity fallback (it needs accuracy) is skipped."""
    cfg = (config or Int8Config()).model_copy(update=settings) if settings else (config or Int8Config())
    if settings:
        cfg = Int8Config.model_validate(cfg.model_dump())  # unknown or bad keywords fail here, by name
    out = Path(out)
    info: dict[str, Any] = {"scheme": scheme.to_manifest()}
    info.update(_make_int8(fp32, out, splits, scheme, cfg, student=student, teacher=teacher, qat_cfg=qat_cfg, loss=loss,
                           work=work, progress=progress))
    float_ops = (info.get("qat") or info.get("ptq") or {}).get("float_ops", [])  # dynamic: everything but MatMul/Gemm, by design
    if float_ops:
        log(f"[quantize] note: the {scheme.name} scheme does not quantize {', '.join(float_ops)}; they stay in float", enabled=progress)
    metrics = _measure_int8(fp32, out, splits, output_names)
    if output_names is not None:
        info["fallback"] = {"skipped": "the outputs are not class logits: no accuracy to choose layers by; nothing kept in float"}
        log(f"[quantize] INT8 vs FP32 outputs on {metrics['n_test']} test images: {metrics['output_fidelity_text']}; "
            "the accuracy fallback is skipped (no accuracy for these outputs)", enabled=progress)
    elif cfg.mode == "dynamic" and metrics["accuracy_drop_points"] > cfg.tolerance_points:
        info["fallback"] = {"skipped": "dynamic INT8 has no Q/DQ layers to keep in float; the tolerance decides FP32 vs INT8"}
    elif metrics["accuracy_drop_points"] > cfg.tolerance_points and len(splits.val):
        info["fallback"] = _fallback(fp32, out, splits, cfg, metrics, progress=progress)
    metrics["kept_in_float"] = (info.get("fallback") or {}).get("kept_in_float", [])
    if scheme.name == "tensorrt":
        info["qdq_rule_check"] = _check_tensorrt_rules(out)
    return {"info": info, "metrics": metrics}


def _make_int8(fp32: Path, out: Path, splits: Any, scheme: Scheme, cfg: Int8Config, *, student: Any, teacher: Any, qat_cfg: Any,
               loss: Any, work: Path | None, progress: bool) -> dict[str, Any]:
    """Step 1: the QDQ model, by QAT (a torch student under distillation) or PTQ; returns the method's info."""
    from kdtoolkit.data.datasets import to_tensor

    sample = tuple(to_tensor(splits.train.x[:1], splits.spec).shape[1:])
    check_calib_shape(fp32, sample)
    if cfg.mode == "dynamic":
        if cfg.method == "qat":
            raise InputError("QAT trains static Q/DQ scales; dynamic INT8 has none (use --int8-mode static with QAT)")
        log("[quantize] dynamic INT8 (ORT quantize_dynamic: int8 MatMul/Gemm weights, activation ranges at run time)", enabled=progress)
        return {"method": "dynamic", "dynamic": quantize_dynamic_onnx(fp32, out, scheme)}
    if cfg.method == "qat" and student is not None:
        from kdtoolkit.quant.qat import QatConfig, export_qdq, run_qat

        qcfg = qat_cfg or QatConfig()
        log(f"[quantize] QAT under distillation ({qcfg.max_steps or 'all'} steps, {qcfg.epochs} epoch(s) at most)", enabled=progress)
        gm, qi = run_qat(student, teacher, splits, scheme, qcfg, work or out.parent / ".qat-work", calib_size=cfg.calib_size,
                         loss=loss, progress=progress)
        qi.update(export_qdq(gm, (1, *sample), out, opset=cfg.opset))
        if scheme.name == "ort_x86":
            qi["channel_aligned_convs"] = align_input_channels(out)
        qi["float_ops"] = unquantizable_ops(fp32, scheme)
        return {"method": "qat", "qat": qi}
    log(f"[quantize] PTQ ({cfg.calib_method}, {cfg.calib_size} calibration samples from the training split)", enabled=progress)
    x = calib_array(splits, cfg.calib_size, seed=cfg.seed)
    return {"method": "ptq", "ptq": quantize_onnx(fp32, out, x, scheme, method=cfg.calib_method, percentile=cfg.percentile,
                                                  progress=progress)}


def _measure_int8(fp32: Path, out: Path, splits: Any, output_names: list[str] | None = None) -> dict[str, Any]:
    """Step 2: FP32 and INT8 top-1 on the test split, on real ONNX Runtime sessions (never fake-quant); for outputs
    that are not class logits, INT8 against FP32 output by output (max and mean |diff|, also relative to the range)."""
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.evaluate import evaluate, fidelity_text, output_fidelity, predict

    test = splits.test
    if output_names is not None:
        fid = output_fidelity(predict(make_session(fp32), test, splits.spec, all_outputs=True),
                              predict(make_session(out), test, splits.spec, all_outputs=True), output_names)
        return {"accuracy_fp32": None, "accuracy_int8": None, "n_test": len(test), "accuracy_drop_points": None,
                "accuracy_note": "not measured: the outputs are not class logits (no labels for them)",
                "output_fidelity": fid, "output_fidelity_text": fidelity_text(fid)}
    fp32_acc = evaluate(make_session(fp32), test, splits.spec)["accuracy"]
    int8_acc = evaluate(make_session(out), test, splits.spec)["accuracy"]
    return {"accuracy_fp32": fp32_acc, "accuracy_int8": int8_acc, "n_test": len(test), "accuracy_drop_points": 100 * (fp32_acc - int8_acc)}


def _fallback(fp32: Path, out: Path, splits: Any, cfg: Int8Config, metrics: dict[str, Any], *, progress: bool) -> dict[str, Any]:
    """Step 3: INT8 missed the tolerance: keep the most sensitive layers in float (chosen on the validation
    split), rewrite ``out`` and update ``metrics``; returns the fallback report."""
    import onnx

    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.data.datasets import to_tensor
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.export.onnx_export import check_onnx
    from kdtoolkit.quant import sensitivity

    n = min(cfg.val_limit, len(splits.val))
    idx = np.sort(np.random.default_rng(cfg.seed).choice(len(splits.val), n, replace=False))
    vx = to_tensor(splits.val.x[idx], splits.spec).numpy()
    vy = splits.val.y[idx]
    fp32_val = evaluate(make_session(fp32), splits.val.subset(idx), splits.spec)["accuracy"]
    model, rep = sensitivity.fallback(out, fp32_val, vx, vy, cfg.tolerance_points, progress=progress)
    if rep.get("kept_in_float"):
        from kdtoolkit import fsutil

        with fsutil.atomic_path(out, suffix=".onnx") as tmp:  # written whole or not at all, like every file we write
            onnx.save(model, str(tmp))
            check_onnx(tmp)
        int8_acc = metrics["accuracy_int8"]
        after = evaluate(make_session(out), splits.test, splits.spec)["accuracy"]
        rep.update({"test_accuracy_before": int8_acc, "test_accuracy_after": after,
                    "cost": f"{len(rep['kept_in_float'])} layer(s) kept in float: +{100 * (after - int8_acc):.2f} points on test"})
        metrics.update({"accuracy_int8": after, "accuracy_drop_points": 100 * (metrics["accuracy_fp32"] - after)})
    return rep


def _check_tensorrt_rules(out: Path) -> dict[str, Any]:
    """Step 4 (TensorRT scheme): the Q/DQ placement rules TensorRT needs; a break is a CheckFailed."""
    errors = _tensorrt_rule_check(out)
    if errors:
        from kdtoolkit.errors import CheckFailed

        raise CheckFailed(f"the INT8 model breaks TensorRT's Q/DQ rules: {errors[0]}" + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    return {"scheme": "tensorrt", "errors": errors, "passed": True}
