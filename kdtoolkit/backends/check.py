"""Static check of an ONNX file against a target Profile; runs anywhere (no TensorRT, no GPU).

Users need to know before they fly to a Jetson whether their ONNX will parse, whether the Q/DQ
layout is one TensorRT takes, whether the shapes fit the profile, and which layers would fall
off the DLA. Each problem is a :class:`Finding` (severity, node, rule, message); the report is
one line per finding for people and JSON for machines.

Sources, kept next to the tables they fed:
- ONNX ops the TensorRT parser takes: onnx-tensorrt ``docs/operators.md`` per release branch
  (8.5-GA, 8.6-GA, 9.0-GA .. 9.3, 10.0-GA, 10.1-GA; "TensorRT 8.5 supports operators up to Opset 17"),
  kept as the 8.5 table plus each later release's changes (``RELEASE_CHANGES``).
  https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md
- DLA limits: TensorRT developer guide, "DLA Supported Layers and Restrictions"
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html).
  General restrictions as that page states them: batch <= 4096, non-batch dims <= 8192, no dynamic
  dimensions (min = opt = max), FP16/INT8 only; activations 2D only (ReLU, Sigmoid, TanH, Clip, ...).
  Per-layer limits as in the 8.6/10.x editions of that section (check your version's page when a
  finding surprises you): convolution kernel 1..32, padding 0..31, stride 1..8, dilation 1..32, groups
  and output maps <= 8192; deconvolution padding 0; pooling 2D max/average with window 1..8, padding
  0..7, stride 1..16; leaky ReLU too; concatenation along channels; LRN window 3, 5, 7 or 9. TensorRT
  before 11 takes DLA INT8 from a calibrator (implicit), not from Q/DQ nodes. Layers outside these
  fall back to the GPU (GPU_FALLBACK) or fail the build.
- Transformer blocks (LayerNorm, GELU, Softmax, INT8 MatMul, MHA fusion, FP16 overflow): kdtoolkit.backends.transformer_check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kdtoolkit.errors import InputError
from kdtoolkit.quant.qdq_rules import (
    Finding,
    Severity,
    _attr,
    constants,
    has_qdq,
    node_label,
    qdq_findings,
)

__all__ = ["Finding", "CheckReport", "check_file", "check_model", "parser_supports"]

def _version_tuple(text: str) -> tuple[int, int]:
    from kdtoolkit.backends.trt.version import parse_version

    major, minor, _ = parse_version(text)
    return major, minor


# onnx-tensorrt docs/operators.md, the "Supported" column, per release branch (Y = the parser imports the op):
# the release/8.5-GA table (the oldest parser kdtoolkit targets) and what each later release table changed.
# Versions newer than the newest table listed here use that table; ops in no table are "unknown".
OPERATORS_MD_SOURCES = {
    "8.5": "onnx/onnx-tensorrt release/8.5-GA fdeeaca87ad2", "8.6": "release/8.6-GA ee0b139bc685", "9.0": "9.0-GA 9d2d786c9812",
    "9.1": "9.1 877b5dccf577", "9.2": "9.2 306247b30da1", "9.3": "9.3 1def182e2a04", "10.0": "10.0-GA 73f629e04a68",
    "10.1": "10.1-GA 96e781103cfc",
}
TRT85_SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal
Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization
IsNaN LRN LSTM LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow
QuantizeLinear RNN RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
TRT85_UNSUPPORTED = frozenset("""
Bernoulli BitShift BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear HammingWindow
HannWindow Hardmax IsInf LayerNormalization MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul STFT SequenceAt
SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss
SplitToSequence StringNormalizer TfIdfVectorizer Unique
""".split())
# (release, ops that became Y, ops that became or were added as N), in release order
RELEASE_CHANGES: tuple[tuple[tuple[int, int], frozenset[str], frozenset[str]], ...] = (
    ((8, 6), frozenset({"GroupNormalization", "IsInf", "LayerNormalization"}), frozenset()),
    ((9, 0), frozenset(), frozenset({"CastLike"})),
    ((9, 1), frozenset({"CastLike"}), frozenset()),
    ((9, 2), frozenset({"Hardmax"}), frozenset()),
    ((10, 0), frozenset({"Gelu", "Mish"}), frozenset({"AffineGrid", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
                                                       "CenterCropPad", "Col2Im", "ImageDecoder", "RegexFullMatch",
                                                       "StringConcat", "StringSplit"})),
    ((10, 1), frozenset({"DeformConv"}), frozenset()),
)


def operator_table(version: str = "8.5") -> dict[str, bool]:
    """op -> supported, as the operators.md of the newest release table at or below ``version`` says."""
    v = _version_tuple(version)
    table = {op: True for op in TRT85_SUPPORTED}
    table.update({op: False for op in TRT85_UNSUPPORTED})
    for rel, yes, no in RELEASE_CHANGES:
        if rel > v:
            break
        table.update({op: True for op in yes})
        table.update({op: False for op in no})
    return table


def _first_supported() -> dict[str, tuple[int, int]]:
    out = {op: (8, 5) for op in TRT85_SUPPORTED}
    for rel, yes, _ in RELEASE_CHANGES:
        for op in yes:
            out.setdefault(op, rel)
    return out


# first TensorRT release whose table marks the op supported (for messages)
ADDED_IN: dict[str, tuple[int, int]] = {op: v for op, v in _first_supported().items() if v > (8, 5)}
# ops no release table marks supported (a custom-domain node of that name is surely unparsable)
TRT_UNSUPPORTED = frozenset(op for op, ok in operator_table("99.0").items() if not ok)

DLA_MAX_BATCH = 4096
DLA_MAX_DIM = 8192
_DLA_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu"}
_DLA_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Equal", "Greater", "Less"}
_DLA_SHUFFLE = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
_DLA_FREE = {"Identity", "Dropout", "Constant", "QuantizeLinear", "DequantizeLinear", "BatchNormalization"}


def parser_supports(op: str, version: str = "8.5") -> bool | None:
    """True/False when the TensorRT ``version`` ONNX parser is known to take/reject ``op``; None when not in the table.

    An op only a later release's table lists (GroupNormalization before 8.6) is False: that parser predates it.
    """
    ok = operator_table(version).get(op)
    if ok is None and op in ADDED_IN and ADDED_IN[op] > _version_tuple(version):
        return False
    return ok


@dataclass
class CheckReport:
    """The findings of one check, with what was checked against what."""

    onnx: str
    profile: str
    tensorrt_version: str | None
    findings: list[Finding] = field(default_factory=list)

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def errors(self) -> int:
        return self.count("error")

    @property
    def warnings(self) -> int:
        return self.count("warning")

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def counts(self) -> dict[str, int]:
        return {s: self.count(s) for s in ("error", "warning", "info")}

    def lines(self) -> list[str]:
        return [f.line() for f in self.findings]

    def summary(self) -> str:
        c = self.counts()
        target = f"TensorRT >= {self.tensorrt_version}" if self.tensorrt_version else "onnxruntime"
        return f"{self.onnx}: {c['error']} error(s), {c['warning']} warning(s), {c['info']} note(s) against profile {self.profile} ({target})"

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": self.onnx, "profile": self.profile, "tensorrt_version": self.tensorrt_version, "ok": self.ok,
                "counts": self.counts(), "findings": [f.to_dict() for f in self.findings]}


def check_file(path: str | os.PathLike[str], profile: Any, *, tensorrt_version: str | None = None,
               calib_cache: str | os.PathLike[str] | None = None) -> CheckReport:
    """Load ``path`` and check it; an unreadable file is an InputError (exit 2), not a finding.

    ``calib_cache`` defaults to a ``calibration.cache`` beside the ONNX (where kdtoolkit's optimize stage
    writes one for DLA profiles), because whether an INT8 ONNX builds on DLA below TensorRT 11 depends on it.
    """
    import onnx

    from kdtoolkit.backends.trt.calib_cache import CACHE_NAME

    p = str(path)
    if not os.path.isfile(p):
        raise InputError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(p)
    except Exception as exc:
        raise InputError(f"{p}: not an ONNX model ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    if calib_cache is None:
        beside = os.path.join(os.path.dirname(p), CACHE_NAME)
        calib_cache = beside if os.path.isfile(beside) else None
    return check_model(model, profile, source=p, tensorrt_version=tensorrt_version, calib_cache=calib_cache)


def check_model(model: Any, profile: Any, *, source: str = "<model>", tensorrt_version: str | None = None,
                calib_cache: str | os.PathLike[str] | None = None) -> CheckReport:
    """All rules that apply to ``profile``: opset, parser ops, Q/DQ, shapes, INT8 route and (for DLA profiles) DLA layers."""
    import onnx

    trt_cfg = profile.tensorrt if profile.is_tensorrt else None
    version = tensorrt_version or (trt_cfg.min_version if trt_cfg else None)
    rep = CheckReport(onnx=source, profile=profile.name, tensorrt_version=version)
    f = rep.findings
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        f.append(Finding("error", "", "onnx.invalid", f"onnx.checker rejects the model: {str(exc).splitlines()[0][:200]}"))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > profile.max_opset:
        f.append(Finding("error", "", "opset",
                         f"opset {opset} is newer than profile {profile.name} accepts (max_opset {profile.max_opset}); "
                         f"re-export with --opset {profile.max_opset}"))
    if trt_cfg is None:
        f.extend(qdq_findings(model, profile.quant.scheme))
        f.append(Finding("info", "", "backend", f"profile {profile.name} serves with {profile.backend}: only the opset and its "
                                                f"{profile.quant.scheme} Q/DQ rules apply (no TensorRT parser or DLA rules)"))
        return rep
    f.extend(_op_findings(model, version or "8.5"))
    f.extend(qdq_findings(model, "tensorrt"))
    from kdtoolkit.backends.transformer_check import transformer_findings

    f.extend(transformer_findings(model, profile, version or "8.5"))  # LayerNorm/GELU/Softmax/INT8 MatMul/MHA per release
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    shapes = _shapes(inferred.graph)
    f.extend(_shape_findings(model, profile, dla=trt_cfg.dla_core is not None))
    f.extend(_int8_route_findings(model, profile, version or "8.5", calib_cache))
    if trt_cfg.dla_core is not None:
        f.extend(_dla_findings(model, profile, shapes, version or "8.5"))
    return rep


def _cache_entries(calib_cache: str | os.PathLike[str]) -> tuple[int | None, str]:
    """(number of scales, problem) of a calibration cache file."""
    from kdtoolkit.backends.trt.calib_cache import read_calibration_cache

    try:
        _, scales = read_calibration_cache(calib_cache)
    except InputError as exc:
        return None, str(exc)
    return len(scales), "" if scales else f"{calib_cache}: the calibration cache holds no tensor scales"


def _int8_route_findings(model: Any, profile: Any, version: str, calib_cache: str | os.PathLike[str] | None) -> list[Finding]:
    """Whether the INT8 the profile asks for can be built from this ONNX with this TensorRT (an error where it cannot)."""
    from kdtoolkit.backends.trt.version import build_path

    try:
        path = build_path(version)
    except InputError as exc:
        return [Finding("error", "", "tensorrt.version", str(exc))]
    qdq = has_qdq(model)
    dla = profile.tensorrt.dla_core is not None
    int8 = profile.precision == "int8" or (profile.precision == "auto" and qdq)
    out: list[Finding] = []
    if dla and not path.dla:
        out.append(Finding("error", "", "dla.version", f"TensorRT {version} has no DLA for Jetson: DLA builds need TensorRT 8.5 to 10.7 "
                                                       "or 11.4.1+ (JetPack 7.2.2)"))
        return out
    n_scales, problem = _cache_entries(calib_cache) if calib_cache else (None, "")
    if calib_cache and problem:
        out.append(Finding("error", "", "calibration-cache", problem))
        n_scales = None
    if not int8:
        return out
    if path.strongly_typed:
        if not qdq:
            out.append(Finding("error", "", "int8.route", f"TensorRT {version} is strongly typed: INT8 comes only from Q/DQ in the "
                                                          "ONNX, and this ONNX has none (quantize it, or use precision fp16)"))
        return out
    if dla and qdq:
        if n_scales:
            out.append(Finding("info", "", "dla.qdq", f"TensorRT {version} takes INT8 on DLA implicitly: the build strips the Q/DQ "
                                                      f"nodes and reads the {n_scales} activation scales from {os.path.basename(str(calib_cache))} "
                                                      "(written from the Q/DQ scales)"))
        else:
            out.append(Finding("error", "", "dla.qdq",
                               f"TensorRT {version} takes INT8 on DLA only implicitly (a calibration cache), never from Q/DQ nodes, and "
                               "no calibration cache comes with this Q/DQ ONNX: write one from its scales "
                               "(kdtoolkit.backends.trt.calib_cache.write_calibration_cache_from_qdq, as the compress pipeline does for DLA "
                               "profiles) or build from the FP32 ONNX with calibration data"))
    elif not qdq and not n_scales:
        out.append(Finding("warning", "", "int8.calibration",
                           "INT8 from an ONNX without Q/DQ and without a calibration cache: `kdtoolkit build --calib-data` calibrates on "
                           "the device; trtexec cannot calibrate from data (its --int8 alone uses placeholder ranges)"))
    return out


def _op_findings(model: Any, version: str) -> list[Finding]:
    out = []
    for i, n in enumerate(model.graph.node):
        label = node_label(n, i)
        if n.domain not in ("", "ai.onnx"):
            if n.domain == "com.microsoft" or n.op_type in TRT_UNSUPPORTED:
                out.append(Finding("error", label, "unsupported-op",
                                   f"{n.domain}::{n.op_type} is not an ONNX standard op; TensorRT {version} cannot parse it without a plugin"))
            else:
                out.append(Finding("warning", label, "custom-op", f"{n.domain}::{n.op_type} needs a TensorRT plugin registered for that domain"))
            continue
        ok = parser_supports(n.op_type, version)
        if ok is False:
            extra = f" (parsed from TensorRT {'.'.join(map(str, ADDED_IN[n.op_type]))})" if n.op_type in ADDED_IN else ""
            out.append(Finding("error", label, "unsupported-op",
                               f"{n.op_type} is not supported by the TensorRT {version} ONNX parser{extra}"))
        elif ok is None:
            out.append(Finding("warning", label, "unknown-op",
                               f"{n.op_type} is not in kdtoolkit's table of ops the TensorRT {version} parser takes; it may not parse"))
    return out


def _dims(vi: Any) -> list[int | str] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def _shapes(graph: Any) -> dict[str, list[int | str]]:
    out: dict[str, list[int | str]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        d = _dims(vi)
        if d is not None:
            out[vi.name] = d
    for t in graph.initializer:
        out[t.name] = list(t.dims)
    return out


def _graph_inputs(model: Any) -> list[Any]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _shape_findings(model: Any, profile: Any, *, dla: bool) -> list[Finding]:
    out = []
    b = profile.batch
    static = profile.static_input_shape
    for inp in _graph_inputs(model):
        dims = _dims(inp) or []
        name = f"input:{inp.name}"
        if not dims:
            out.append(Finding("error", name, "dynamic-shape", "input has no shape; expected N,C,H,W with at most a dynamic batch"))
            continue
        if static is not None:
            for ax, (got, want) in enumerate(zip(dims, static)):
                if not isinstance(got, int) or got <= 0:
                    out.append(Finding("error", name, "dynamic-shape",
                                       f"axis {ax} is dynamic ({got!r}) but profile {profile.name} pins the static shape {static}; "
                                       "re-export with --static-batch"))
                elif got != want:
                    out.append(Finding("error", name, "static-shape", f"axis {ax} is {got}, the profile pins {want} (static_input_shape {static})"))
            continue
        for ax, got in enumerate(dims[1:], start=1):
            if not isinstance(got, int) or got <= 0:
                out.append(Finding("error", name, "dynamic-shape",
                                   f"axis {ax} is dynamic ({got!r}); only the batch axis may be dynamic (the engine's profile covers batch only)"))
        batch = dims[0]
        if isinstance(batch, int) and batch > 0:
            if (b.min, b.max) != (batch, batch):
                out.append(Finding("error", name, "batch-range",
                                   f"input has a fixed batch {batch} but profile {profile.name} asks for batch {b.min}..{b.max}; "
                                   "export with a dynamic batch axis"))
        elif dla:
            if b.min != b.max:
                out.append(Finding("error", name, "dynamic-shape",
                                   f"DLA has no dynamic dimensions (min = opt = max), but the batch axis is dynamic and the profile asks "
                                   f"for batch {b.min}..{b.max}"))
            else:
                out.append(Finding("warning", name, "dynamic-shape",
                                   f"batch axis is dynamic ({batch!r}); DLA needs a static shape, so the build pins batch {b.opt}"))
        if dla:
            for ax, got in enumerate(dims[1:], start=1):
                if isinstance(got, int) and got > DLA_MAX_DIM:
                    out.append(Finding("error", name, "dla.limits", f"axis {ax} is {got}; DLA takes non-batch dimensions up to {DLA_MAX_DIM}"))
    return out


def _dla_findings(model: Any, profile: Any, shapes: dict[str, list[int | str]], version: str) -> list[Finding]:
    trt_cfg = profile.tensorrt
    out: list[Finding] = []
    if profile.precision == "fp32":
        out.append(Finding("error", "", "dla.precision", "DLA runs FP16 or INT8 only, got precision fp32"))
    if profile.batch.max > DLA_MAX_BATCH:
        out.append(Finding("error", "", "dla.limits", f"DLA takes batch up to {DLA_MAX_BATCH}, the profile asks for {profile.batch.max}"))
    consts = constants(model.graph)
    sev: Severity = "warning" if trt_cfg.gpu_fallback else "error"
    tail = "falls back to the GPU" if trt_cfg.gpu_fallback else "cannot run on DLA and gpu_fallback is false, so the build fails"
    for i, n in enumerate(model.graph.node):
        reason = dla_reason(n, shapes, consts)
        if reason:
            out.append(Finding(sev, node_label(n, i), "dla.fallback", f"{reason}; {tail}"))
    return out


def _ints(v: Any, n: int, default: int) -> list[int]:
    return list(v) if v is not None else [default] * n


def dla_reason(n: Any, shapes: dict[str, list[int | str]], consts: dict[str, Any]) -> str | None:
    """Why DLA cannot run this node (None when it can), from the developer guide's per-layer limits."""
    op = n.op_type
    in_shape = shapes.get(n.input[0]) if n.input else None
    rank = len(in_shape) if in_shape is not None else None
    out_shape = shapes.get(n.output[0]) if n.output else None
    if op in _DLA_FREE:
        return None
    if op in ("Conv", "ConvTranspose"):
        w = shapes.get(n.input[1]) if len(n.input) > 1 else None
        k = list(_attr(n, "kernel_shape") or (w[2:] if w else []))
        if len(k) != 2:
            return f"{op} on DLA is 2D only, got a {len(k)}D kernel"
        if any(not isinstance(x, int) or not 1 <= x <= 32 for x in k):
            return f"{op} kernel {k} is outside DLA's 1..32"
        pads = _ints(_attr(n, "pads"), 4, 0)
        strides = _ints(_attr(n, "strides"), 2, 1)
        dil = _ints(_attr(n, "dilations"), 2, 1)
        if op == "Conv":
            if any(not 0 <= p <= 31 for p in pads):
                return f"Conv padding {pads} is outside DLA's 0..31"
            if any(not 1 <= s <= 8 for s in strides):
                return f"Conv stride {strides} is outside DLA's 1..8"
            if any(not 1 <= d <= 32 for d in dil):
                return f"Conv dilation {dil} is outside DLA's 1..32"
        else:
            if any(p != 0 for p in pads):
                return f"ConvTranspose padding {pads}: DLA deconvolution takes padding 0 only"
            if any(not 1 <= s <= 32 for s in strides):
                return f"ConvTranspose stride {strides} is outside DLA's 1..32"
            if any(d != 1 for d in dil):
                return f"ConvTranspose dilation {dil}: DLA deconvolution takes dilation 1 only"
        groups = int(_attr(n, "group", 1))
        if groups > DLA_MAX_DIM:
            return f"{op} has {groups} groups, DLA takes up to {DLA_MAX_DIM}"
        if w and isinstance(w[0], int) and w[0] > DLA_MAX_DIM:
            return f"{op} has {w[0]} output maps, DLA takes up to {DLA_MAX_DIM}"
        return None
    if op in ("MaxPool", "AveragePool"):
        k = list(_attr(n, "kernel_shape") or [])
        if len(k) != 2:
            return f"{op} on DLA is 2D only, got a {len(k)}D window"
        if any(not 1 <= x <= 8 for x in k):
            return f"{op} window {k} is outside DLA's 1..8"
        pads = _ints(_attr(n, "pads"), 4, 0)
        if any(not 0 <= p <= 7 for p in pads):
            return f"{op} padding {pads} is outside DLA's 0..7"
        strides = _ints(_attr(n, "strides"), 2, 1)
        if any(not 1 <= s <= 16 for s in strides):
            return f"{op} stride {strides} is outside DLA's 1..16"
        if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
            return "MaxPool with an indices output is not a DLA pooling"
        return None
    if op in ("GlobalAveragePool", "GlobalMaxPool"):
        hw = in_shape[2:] if in_shape else None
        if not hw or len(hw) != 2 or not all(isinstance(x, int) for x in hw):
            return f"{op} window depends on an unknown spatial size; DLA pooling windows must be 1..8"
        if any(int(x) > 8 for x in hw):
            return f"{op} window {list(hw)} is outside DLA's pooling window 1..8"
        return None
    if op in _DLA_ACTIVATIONS:
        return None if rank in (None, 4) else f"{op} on DLA needs a 4D tensor, got rank {rank}"
    if op == "PRelu":
        return None if len(n.input) > 1 and n.input[1] in consts else "PRelu slope must be a build-time constant on DLA"
    if op in _DLA_ELEMENTWISE:
        return None if rank in (None, 4) else f"{op} on DLA needs 4D tensors, got rank {rank}"
    if op == "Concat":
        axis = int(_attr(n, "axis", 1))
        if rank and axis < 0:
            axis += rank
        return None if axis == 1 else f"Concat along axis {axis}: DLA concatenates along channels (axis 1) only"
    if op == "Resize":
        mode = _attr(n, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        return None if mode in ("nearest", "linear") else f"Resize mode {mode!r}: DLA resizes nearest or linear only"
    if op == "Softmax":
        axis = int(_attr(n, "axis", -1))
        if rank and axis < 0:
            axis += rank
        return None if rank == 4 and axis == 1 else f"Softmax over axis {axis} of a rank-{rank} tensor: DLA (Orin) softmaxes 4D tensors over channels only"
    if op == "LRN":
        size = int(_attr(n, "size", 0))
        return None if size in (3, 5, 7, 9) else f"LRN window {size}: DLA takes 3, 5, 7 or 9"
    if op in _DLA_SHUFFLE:
        r = len(out_shape) if out_shape is not None else None
        return None if r == 4 and rank == 4 else f"{op} to a rank-{r} tensor: DLA shuffles 4D tensors only"
    if op == "Slice":
        static = all(x in consts for x in n.input[1:] if x)
        return None if rank == 4 and static else "Slice on DLA needs a 4D tensor and constant starts/ends/axes/steps"
    if op in ("Gemm", "MatMul"):
        return (f"{op} on a rank-{rank} tensor: DLA runs matrix multiplies only as 1x1 convolutions of 4D tensors with "
                "constant weights")
    if op == "Pad":
        return "Pad: DLA has no standalone padding layer"
    return f"{op} is not a layer DLA runs"


def record_tensorrt_check(writer: Any, profile: Any, *, onnx_name: str = "model.onnx", calib_data: str | None = None) -> CheckReport:
    """For a TensorRT profile built off the device: check.json, counts in metrics, build_on_device.sh, and for DLA
    below TensorRT 11 the calibration cache (+ the Q/DQ-free ONNX) written from the Q/DQ scales.

    Used by the compress pipeline's optimize stage, so a run without TensorRT still hands over
    the static check and the exact on-device build commands (never a pretend engine), and a DLA profile's
    INT8 Q/DQ model arrives in a form TensorRT 8.5 .. 10.x can build (implicit INT8 from the cache).
    """
    import onnx

    from kdtoolkit import fsutil
    from kdtoolkit.backends.trt.calib_cache import (
        CACHE_NAME,
        STRIPPED_NAME,
        write_calibration_cache_from_qdq,
    )
    from kdtoolkit.backends.trt.commands import build_commands, build_script
    from kdtoolkit.backends.trt.version import build_path

    onnx_path = writer.path(onnx_name)
    trt_cfg = profile.tensorrt
    cache: str | None = None
    stripped: str | None = None
    problem: Finding | None = None
    try:
        oldest = build_path(trt_cfg.min_version)
    except InputError:
        oldest = None
    wants_int8 = profile.precision in ("int8", "auto")
    if trt_cfg.dla_core is not None and wants_int8 and oldest is not None and not oldest.strongly_typed \
            and has_qdq(onnx.load(str(onnx_path), load_external_data=False)):
        try:
            info = write_calibration_cache_from_qdq(onnx_path, writer.path(CACHE_NAME), writer.path(STRIPPED_NAME),
                                                    tensorrt_version=trt_cfg.min_version)
        except InputError as exc:
            problem = Finding("error", "", "dla.qdq", f"cannot turn the Q/DQ scales into a calibration cache: {exc}")
        else:
            cache, stripped = CACHE_NAME, STRIPPED_NAME
            writer.info["calibration_cache"] = info
    rep = check_file(onnx_path, profile, calib_cache=writer.path(cache) if cache else None)
    if problem is not None:
        rep.findings.insert(0, problem)
    if writer.info.get("opset_note"):  # what the export did so the oldest parser takes the graph
        rep.findings.append(Finding("info", "", "export.opset", writer.info["opset_note"]))
    rep.onnx = onnx_name
    fsutil.write_json(writer.path("check.json"), rep.to_dict())
    cmds = build_commands(onnx_path, profile, calib_data=calib_data, onnx_name=onnx_name, calib_cache_name=cache,
                          stripped_onnx_name=stripped)
    script = writer.path("build_on_device.sh")
    fsutil.write_text(script, build_script(cmds, profile, rep.counts()))
    script.chmod(0o755)
    writer.metrics["tensorrt_check"] = {"errors": rep.errors, "warnings": rep.warnings, "tensorrt_version": rep.tensorrt_version}
    writer.info["on_device_build"] = {"script": "build_on_device.sh", "kdtoolkit": cmds["kdtoolkit"], "trtexec": cmds["trtexec"],
                                      "trtexec_precision": cmds["trtexec_precision"], "calibration_cache": cache,
                                      "onnx_for_trtexec": cmds["onnx_for_trtexec"]}
    return rep
