"""Per-layer sensitivity and the float fallback, on the real runtime's QDQ graph.

Works on any QDQ ONNX model (from PTQ or QAT alike): "keep layer L in float" means the DQ nodes
feeding L are bypassed (activation: the tensor before its Q; weight: the dequantized float
weight), so L runs in FP32 while every other layer stays exactly as quantized. Sensitivity of L =
validation top-1 with only L in float minus with none (leave-one-in-float, measured with an ORT
session on a seeded validation subset: the test split is for the final figure only). The most
sensitive layers go back to float one by one until the accuracy drop fits the tolerance.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.progress import log


def quantized_layers(model: Any) -> list[str]:
    """Names of Conv/Gemm/MatMul nodes whose weight comes through a DequantizeLinear."""
    prod = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
            p = prod.get(n.input[1])
            if p is not None and p.op_type == "DequantizeLinear":
                out.append(n.name)
    return out


def keep_in_float(model: Any, layers: list[str]) -> Any:
    """A copy of ``model`` with ``layers`` computing in float (their input DQs bypassed)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    want = set(layers)
    missing = want - {n.name for n in m.graph.node}
    if missing:
        from kdtoolkit.errors import InputError

        raise InputError(f"no such layer(s) in the model: {', '.join(sorted(missing))}")
    added = 0
    relu_of: dict[str, str] = {}
    new_nodes: list[tuple[Any, Any]] = []  # (node to insert, insert before this node)

    def float_source(q: Any, before: Any) -> str:
        """The float tensor a bypassed activation Q/DQ pair stood for. ORT's quantizer folds a ReLU into the
        u8 range of its producer's output (zero point at the bottom of the range: Q clamps below at exactly
        0), so that float tensor is pre-ReLU: give it back its ReLU, or the floated layer sees negatives."""
        src = q.input[0]
        zp = inits.get(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if zp is None:
            return src
        z = numpy_helper.to_array(zp)
        qmin = np.iinfo(z.dtype).min
        if z.size != 1 or int(z.reshape(-1)[0]) != qmin:
            return src
        if src not in relu_of:
            relu_of[src] = f"{src}_relu_kept{len(relu_of)}"
            new_nodes.append((onnx.helper.make_node("Relu", [src], [relu_of[src]], name=f"{src}_relu_kept"), before))
        return relu_of[src]

    for n in m.graph.node:
        if n.name not in want:
            continue
        for k, t in enumerate(n.input):
            dq = prod.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = dq.input[0]
            q = prod.get(src)
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[k] = float_source(q, n)  # activation: the float tensor before Q
            elif src in inits:
                w = numpy_helper.to_array(inits[src]).astype(np.float32)
                s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
                zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(s)
                axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                shape = [1] * w.ndim
                if s.size > 1:
                    shape[axis] = -1
                f = (w - zp.reshape(shape)) * s.reshape(shape)
                name = f"{src}_float{added}"
                added += 1
                m.graph.initializer.append(numpy_helper.from_array(f.astype(np.float32), name))
                n.input[k] = name
    # and their outputs reach consumers in float: bypass a Q -> DQ pair right after a floated layer
    floated_out = {o for n in m.graph.node if n.name in want for o in n.output}
    dq_src = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear":
            q = prod.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in floated_out:
                dq_src[n.output[0]] = float_source(q, q)
    for n in m.graph.node:
        for k, t in enumerate(n.input):
            if t in dq_src:
                n.input[k] = dq_src[t]
    for node, before in new_nodes:  # keep topological order: the Relu right before its first reader
        idx = next(i for i, x in enumerate(m.graph.node) if list(x.output) == list(before.output))
        m.graph.node.insert(idx, node)
    graph_out = {o.name for o in m.graph.output}
    for name in graph_out & set(dq_src):  # a floated last layer writes the graph output itself
        src = dq_src[name]
        dead = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == name]
        for n in dead:
            m.graph.node.remove(n)
        for n in m.graph.node:
            n.output[:] = [name if o == src else o for o in n.output]
            n.input[:] = [name if i == src else i for i in n.input]
    _prune(m)
    return m


def _prune(m: Any) -> None:
    """Drop nodes and initializers nothing reads any more."""
    needed = {o.name for o in m.graph.output}
    keep = []
    for n in reversed(list(m.graph.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del m.graph.node[:]
    m.graph.node.extend(keep)
    live = [i for i in m.graph.initializer if i.name in needed]
    del m.graph.initializer[:]
    m.graph.initializer.extend(live)


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import onnx

    from kdtoolkit.backends.ort import make_session

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.onnx"
        onnx.save(model, str(p))
        s = make_session(p)
        name = s.get_inputs()[0].name
        pred = np.concatenate([s.run(None, {name: x[i:i + 256]})[0].argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).mean())


def fallback(
    qdq_path: str | os.PathLike[str],
    fp32_accuracy: float,
    x: np.ndarray,
    y: np.ndarray,
    tolerance_points: float,
    *,
    max_layers: int | None = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Rank layers by leave-one-in-float gain on (x, y) and float the most sensitive until the drop
    vs ``fp32_accuracy`` (measured on the same x, y) is within ``tolerance_points``.

    Returns (model, report); the report lists every layer's sensitivity, what stayed in float and
    the validation accuracy before and after."""
    import onnx

    model = onnx.load(str(qdq_path))
    layers = quantized_layers(model)
    base = _accuracy(model, x, y)
    report: dict[str, Any] = {"validation_samples": int(len(x)), "fp32_val_accuracy": fp32_accuracy, "int8_val_accuracy": base,
                              "tolerance_points": tolerance_points, "kept_in_float": [], "sensitivity": {}}
    if 100 * (fp32_accuracy - base) <= tolerance_points:
        report["needed"] = False
        return model, report
    report["needed"] = True
    log(f"[quantize] INT8 drops {100 * (fp32_accuracy - base):.2f} points on validation (> {tolerance_points}); "
        f"ranking {len(layers)} layers by sensitivity", enabled=progress)
    gains = {}
    for name in layers:
        gains[name] = _accuracy(keep_in_float(model, [name]), x, y) - base
    report["sensitivity"] = {k: round(v, 6) for k, v in sorted(gains.items(), key=lambda kv: -kv[1])}
    order = sorted(layers, key=lambda n: -gains[n])
    limit = len(order) if max_layers is None else min(max_layers, len(order))
    chosen: list[str] = []
    acc = base
    cur = model
    for name in order[:limit]:
        chosen.append(name)
        cur = keep_in_float(model, chosen)
        acc = _accuracy(cur, x, y)
        if 100 * (fp32_accuracy - acc) <= tolerance_points:
            break
    report.update({"kept_in_float": chosen, "int8_val_accuracy_after": acc, "fits": 100 * (fp32_accuracy - acc) <= tolerance_points})
    return cur, report
