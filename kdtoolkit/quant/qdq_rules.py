"""The Q/DQ rules of each quantization scheme, in ONE place: the static check and the quantizer both use them.

TensorRT (scheme ``tensorrt``) takes explicit quantization only as QuantizeLinear/DequantizeLinear
pairs with symmetric int8 (zero point 0), weights per output channel (axis 0 of a Conv weight),
activations per tensor; ORT's QOperator ops (QLinearConv, ConvInteger, MatMulInteger, ...) are
rejected by its ONNX parser (onnx-tensorrt docs/operators.md: "x_zero_point must be zero",
"y_zero_point must be 0", QLinearConv / ConvInteger / MatMulInteger: N).
ONNX Runtime on x86 (``ort_x86``) wants u8 asymmetric activations and s8 symmetric per-channel
weights; on ARM (``ort_arm``) s8 activations and s8 symmetric weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Severity = Literal["error", "warning", "info"]

QOPERATOR_OPS = frozenset({
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
    "QGemm", "QAttention", "DynamicQuantizeLinear", "DynamicQuantizeMatMul",
})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

# scheme -> (activation int type, activations must be symmetric)
_ACT = {"tensorrt": ("int8", True), "ort_x86": ("uint8", False), "ort_arm": ("int8", False)}
_INT_NAMES = {2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 17: "float8e4m3fn", 21: "uint4", 22: "int4"}


@dataclass(frozen=True)
class Finding:
    """One problem (or note) about one node: what rule, how bad, and a message that says expected vs got."""

    severity: Severity
    node: str
    rule: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.severity}: [{self.rule}] {self.node or '<graph>'}: {self.message}"


def constants(graph: Any) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of a graph, as numpy arrays."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def node_label(node: Any, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _weight_dqs(graph: Any) -> dict[str, tuple[str, int]]:
    """Output name of every Q/DQ chain that feeds a weight input -> (consumer op, output-channel axis)."""
    producers = {o: n for n in graph.node for o in n.output}
    found: dict[str, tuple[str, int]] = {}
    for n in graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1:
            w = n.input[1]
            axis = {"Conv": 0, "ConvTranspose": 1}.get(n.op_type, 0 if _attr(n, "transB", 0) else 1)
            p = producers.get(w)
            while p is not None and p.op_type in QDQ_OPS:
                found[p.output[0]] = (n.op_type, axis)
                p = producers.get(p.input[0])
    return found


def qdq_findings(model: Any, scheme: str = "tensorrt") -> list[Finding]:
    """Check every Q/DQ node (and QOperator op) of ``model`` against ``scheme``; return the findings."""
    if scheme not in _ACT:
        from kdtoolkit.errors import InputError

        raise InputError(f"quantization scheme must be one of {', '.join(_ACT)}, got {scheme!r}")
    graph = model.graph
    consts = constants(graph)
    weights = _weight_dqs(graph)
    act_type, act_symmetric = _ACT[scheme]
    trt = scheme == "tensorrt"
    out: list[Finding] = []
    for i, n in enumerate(graph.node):
        label = node_label(n, i)
        if n.op_type in QOPERATOR_OPS:
            out.append(Finding(
                "error" if trt else "warning", label, "qdq.qoperator",
                f"{n.op_type} is ONNX Runtime's QOperator format; expected QuantizeLinear/DequantizeLinear (QDQ)"
                + (" (TensorRT's parser rejects it)" if trt else ""),
            ))
            continue
        if n.op_type not in QDQ_OPS:
            continue
        weight = weights.get(n.output[0])
        scale = consts.get(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            out.append(Finding("error", label, "qdq.scale_constant", "scale must be a constant initializer, got a computed tensor"))
        elif np.any(~np.isfinite(scale)) or np.any(scale <= 0):
            out.append(Finding("error", label, "qdq.scale_positive", "scales must be finite and > 0, got a non-positive or non-finite scale"))
        # zero point: value and integer type
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        zp = consts.get(zp_name) if zp_name else None
        if zp_name and zp is None:
            out.append(Finding("error", label, "qdq.zero_point_constant", "zero point must be a constant initializer, got a computed tensor"))
        want_type = "int8" if weight else act_type
        want_symmetric = bool(weight) or act_symmetric
        if zp is None and not zp_name:
            if trt:
                out.append(Finding("warning", label, "qdq.zero_point_missing",
                                   "no zero point: ONNX then means uint8; expected an explicit int8 zero point of 0"))
        elif zp is not None:
            got_type = str(zp.dtype)
            if got_type != want_type:
                out.append(Finding("error", label, "qdq.dtype",
                                   f"{'weight' if weight else 'activation'} zero point must be {want_type} for scheme {scheme}, got {got_type}"))
            if want_symmetric and np.any(zp != 0):
                nz = int(np.count_nonzero(zp))
                out.append(Finding("error", label, "qdq.zero_point",
                                   f"zero point must be 0 (symmetric {want_type}) for {'weights' if weight else 'activations'} "
                                   f"under scheme {scheme}, got {nz} non-zero value(s), e.g. {int(zp.flat[np.flatnonzero(zp)[0]])}"))
        if scale is None:
            continue
        if weight:
            op, axis = weight
            per_channel = scale.ndim == 1 and scale.size > 1
            if not per_channel:
                sev: Severity = "warning" if op in ("Conv", "ConvTranspose") else "info"
                out.append(Finding(sev, label, "qdq.weight_per_channel",
                                   f"{op} weight scales should be per output channel (axis {axis}), got one per-tensor scale"))
            else:
                got_axis = int(_attr(n, "axis", 1))
                wt = consts.get(n.input[0])
                ndim = wt.ndim if wt is not None else None
                if ndim is not None and got_axis < 0:
                    got_axis += ndim
                if got_axis != axis:
                    out.append(Finding("error", label, "qdq.weight_axis",
                                       f"{op} weight scales must run along the output-channel axis {axis}, got axis {got_axis}"))
                elif wt is not None and wt.shape[axis] != scale.size:
                    out.append(Finding("error", label, "qdq.weight_axis",
                                       f"{op} weight has {wt.shape[axis]} output channels but {scale.size} scales"))
        elif scale.size > 1:
            out.append(Finding("error" if trt else "warning", label, "qdq.activation_per_tensor",
                               f"activation scales must be per tensor (one scale), got {scale.size}"))
    return out


def has_qdq(model: Any) -> bool:
    return any(n.op_type in QDQ_OPS for n in model.graph.node)
