"""Quantization schemes: the Q/DQ layout each backend runs fastest, taken from the profile.

One :class:`Scheme` drives PTQ (onnxruntime's ``quantize_static`` arguments), QAT (the torch
fake-quant ranges) and the manifest, so the three can never disagree. The integer ranges are the
ones onnxruntime's quantizer uses (``quant_utils.get_qmin_qmax_for_qType``): symmetric int8 is
[-127, 127]; reduce_range weights are [-64, 64] (7 bits, against u8s8 saturation on x86 without
VNNI); activations are never range-reduced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kdtoolkit.errors import InputError

# ops whose inputs get Q/DQ (weights per output channel); Add = both inputs of a residual add so
# TensorRT fuses it and ORT runs QLinearAdd. Everything else runs on dequantized floats.
QUANT_OPS = ("Conv", "Gemm", "MatMul", "Add")
# ops that carry activations between quantized ops without changing the scale meaningfully
PASS_THROUGH_OPS = ("Relu", "MaxPool", "GlobalAveragePool", "AveragePool", "Flatten", "Reshape", "Pad", "Slice", "Concat",
                    "Transpose", "Squeeze", "Unsqueeze", "Identity", "Clip", "Resize")


@dataclass(frozen=True)
class Scheme:
    """What the runtime wants for INT8."""

    name: str
    activation_dtype: str  # "uint8" | "int8"
    activation_symmetric: bool
    weight_dtype: str  # always "int8"
    weight_per_channel: bool
    weight_axis: int
    reduce_range: bool
    quant_ops: tuple[str, ...] = QUANT_OPS
    note: str = ""

    # -- integer ranges (the same as onnxruntime's quantizer) ----------------------------------------
    @property
    def act_range(self) -> tuple[int, int]:
        """Range the ONNX QuantizeLinear clamps to (its dtype's full range)."""
        return (0, 255) if self.activation_dtype == "uint8" else (-128, 127)

    @property
    def act_calib_range(self) -> tuple[int, int]:
        """Range scales are computed from (symmetric int8 uses [-127, 127], as ORT and TensorRT do)."""
        if self.activation_dtype == "int8" and self.activation_symmetric:
            return (-127, 127)
        return self.act_range

    @property
    def weight_range(self) -> tuple[int, int]:
        return (-64, 64) if self.reduce_range else (-127, 127)

    def act_qparams(self, rmin: float, rmax: float) -> tuple[float, int]:
        """(scale, zero_point) for an activation range, exactly as ORT's ``compute_scale_zp`` does."""
        import numpy as np

        qmin, qmax = self.act_calib_range
        rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
        if self.activation_symmetric:
            a = max(abs(rmin), abs(rmax))
            rmin, rmax = -a, a
        scale = (rmax - rmin) / (qmax - qmin)
        if scale < np.finfo(np.float32).tiny:
            return 1.0, 0
        scale = float(np.float32(scale))
        if self.activation_symmetric:
            zp = int(round((qmin + qmax) / 2.0))
        else:
            zp = int(np.clip(np.round(qmin - rmin / scale), qmin, qmax))
        return scale, zp

    # -- onnxruntime.quantization arguments -------------------------------------------------------------
    def ort_kwargs(self) -> dict[str, Any]:
        from onnxruntime.quantization import QuantFormat, QuantType

        return {
            "quant_format": QuantFormat.QDQ,
            "activation_type": QuantType.QUInt8 if self.activation_dtype == "uint8" else QuantType.QInt8,
            "weight_type": QuantType.QInt8,
            "per_channel": self.weight_per_channel,
            "reduce_range": self.reduce_range,
            # ORT schemes: ORT's own op list (None = its QDQ registry). Restricting it to Conv/Gemm/Add left every
            # Relu with its own Q/DQ pair (141 Q nodes on ResNet-56 against ORT's 90) and ran ~0.8x of ORT's speed;
            # with Relu/Clip in the list ORT's quantizer drops them into the u8 output range, as ORT's runtime expects.
            "op_types_to_quantize": list(self.quant_ops) if self.name == "tensorrt" else None,
            "extra_options": {"ActivationSymmetric": self.activation_symmetric, "WeightSymmetric": True,
                              # TensorRT takes float biases (its Q/DQ rules reject int32 bias DQs); ORT fuses int32 ones
                              "QuantizeBias": self.name != "tensorrt"},
        }

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({"activation_range": list(self.act_range), "weight_range": list(self.weight_range), "format": "QDQ",
                  "activations": "per-tensor", "weights": f"per-channel (axis {self.weight_axis})" if self.weight_per_channel else "per-tensor",
                  "rounding": "round half to even (ONNX QuantizeLinear, torch fake_quantize)"})
        d["quant_ops"] = list(self.quant_ops)
        if self.name != "tensorrt":
            d["quant_op_list"] = ("onnxruntime quantize_static's own (QDQ registry): ReLU/Clip folded into the producer's uint8 "
                                  "output, Add -> QLinearAdd, pooling and shape ops on uint8, as ORT's fusions expect")
        return d


def scheme_for(profile: Any, *, reduce_range: bool | None = None) -> Scheme:
    """The scheme a profile asks for; ``reduce_range`` resolved from the profile (auto = local CPU VNNI)."""
    name = profile.quant.scheme
    rr = profile.resolved_reduce_range() if reduce_range is None else reduce_range
    if name == "tensorrt":
        return Scheme("tensorrt", "int8", True, "int8", True, 0, False,
                      note="symmetric s8, zero point 0; DQ fuses into Conv/Gemm, both Add inputs quantized so the add fuses")
    if name == "ort_x86":
        why = "7-bit weights: no VNNI on the target CPU (u8s8 can saturate)" if rr else "8-bit weights"
        return Scheme("ort_x86", "uint8", False, "int8", True, 0, bool(rr), note=f"u8 asymmetric activations, s8 per-channel weights; {why}")
    if name == "ort_arm":
        return Scheme("ort_arm", "int8", False, "int8", True, 0, False, note="s8 activations and weights (ARM dot-product kernels)")
    raise InputError(f"unknown quantization scheme {name!r} (known: tensorrt, ort_x86, ort_arm)")


INT8_MIN_GAIN = 0.03  # INT8 is shipped by `auto` only when at least this much faster than FP32


def pick_precision(
    policy: str,
    *,
    fp32_ms: float | None,
    int8_ms: float | None,
    fp32_acc: float | None,
    int8_acc: float | None,
    tolerance_points: float,
    batch: int,
    tensorrt: bool = False,
    by_batch: dict[int, tuple[float, float]] | None = None,
    fidelity: str | None = None,
) -> tuple[str, str]:
    """(precision, reason) from measured numbers: the faster one that meets the accuracy tolerance.

    ``fp32_ms``/``int8_ms`` are at ``batch`` (the profile's opt batch), which decides. ``by_batch``
    ({batch: (fp32_ms, int8_ms)}) holds every batch timed; the reason quotes the ratio at each, so a
    choice that wins at the opt batch but loses at another is visible, not hidden.
    ``policy`` int8 ships INT8 even when it is slower, but the reason then says so; fp32/fp16 are
    taken as asked. For TensorRT targets off the device the speed is TensorRT's to decide: INT8
    QDQ is shipped when it meets the tolerance (accuracy from ORT CPU, a proxy).

    ``fp32_acc`` None: the outputs are not class logits, so no accuracy can be measured; the decision is then by
    speed alone (``auto``), the reason says so and quotes ``fidelity`` (INT8 vs FP32 outputs) when given."""
    prec, why = _pick(policy, fp32_ms=fp32_ms, int8_ms=int8_ms, fp32_acc=fp32_acc, int8_acc=int8_acc,
                      tolerance_points=tolerance_points, batch=batch, tensorrt=tensorrt, fidelity=fidelity)
    others = {b: v for b, v in (by_batch or {}).items() if b != batch and v[0] and v[1]}
    if others and not tensorrt and policy not in ("fp32", "fp16"):
        why += "; decided at the profile's opt batch " + str(batch) + "; INT8/FP32 speed at the other batches: " + \
            ", ".join(f"batch {b} {f / i:.2f}x" for b, (f, i) in sorted(others.items()))
    return prec, why


def _pick(
    policy: str,
    *,
    fp32_ms: float | None,
    int8_ms: float | None,
    fp32_acc: float | None,
    int8_acc: float | None,
    tolerance_points: float,
    batch: int,
    tensorrt: bool = False,
    fidelity: str | None = None,
) -> tuple[str, str]:
    """The decision at one batch size (see :func:`pick_precision`)."""
    if policy in ("fp32", "fp16"):
        return policy, f"profile precision is {policy}"
    if fp32_acc is None:  # outputs that are not class logits: no labels, so no accuracy; speed decides
        fits = True
        acc_txt = ("accuracy could not be measured (the outputs are not class logits: no labels for them)"
                   + (f"; INT8 vs FP32 outputs: {fidelity}" if fidelity else ""))
    elif int8_acc is None:
        return "fp32", "no INT8 model could be made"
    else:
        drop = 100 * (fp32_acc - int8_acc)
        fits = drop <= tolerance_points
        acc_txt = f"INT8 top-1 {100 * int8_acc:.2f} % vs FP32 {100 * fp32_acc:.2f} % ({-drop:+.2f} points, tolerance {tolerance_points})"
    if tensorrt:
        if policy == "int8" or fits:
            return "int8", (f"TensorRT target: INT8 QDQ shipped, speed is decided by TensorRT on the device (not measured here); "
                            f"{acc_txt} on ONNX Runtime CPU (proxy)")
        return "fp32", f"INT8 misses the accuracy tolerance: {acc_txt} (ONNX Runtime CPU proxy)"
    speed = ""
    faster = None
    if fp32_ms is not None and int8_ms is not None:
        # INT8 must be clearly faster: a near-tie is within run-to-run noise on a shared machine, and then
        # FP32 (the reference accuracy, portable to any CPU) is the better artifact to ship.
        ratio = fp32_ms / int8_ms
        faster = ratio > 1.0 + INT8_MIN_GAIN
        verdict = "faster" if faster else ("SLOWER" if ratio < 1.0 else f"not clearly faster (gain under {100 * INT8_MIN_GAIN:.0f} %)")
        speed = f"INT8 p50 {int8_ms:.3f} ms vs FP32 {fp32_ms:.3f} ms at batch {batch} ({ratio:.2f}x: INT8 is {verdict})"
    if policy == "int8":
        why = "profile precision is int8"
        if faster is False:
            why += f"; note: {speed}"
        elif speed:
            why += f"; {speed}"
        return "int8", f"{why}; {acc_txt}"
    if not fits:
        return "fp32", f"INT8 misses the accuracy tolerance: {acc_txt}" + (f"; {speed}" if speed else "")
    if faster:
        return "int8", f"{speed}; {acc_txt}"
    if faster is False:
        return "fp32", f"{speed}; FP32 shipped. {acc_txt}"
    return "fp32", "INT8 latency not measured; FP32 shipped"
