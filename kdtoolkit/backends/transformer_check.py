"""What each TensorRT release does with a transformer block, as static check findings (no TensorRT needed).

Why: a ViT's ONNX parses on every TensorRT kdtoolkit targets only if LayerNorm is exported right for the
oldest one, and how fast and how accurately it runs depends on what that release fuses and in what
precision it runs the normalisations. The facts, with their sources:

- LayerNormalization (ONNX opset 17) is parsed from TensorRT 8.6 (onnx-tensorrt operators.md, 8.6-GA; it
  becomes one INormalizationLayer). At opset 16 torch decomposes it into ReduceMean/Sub/Pow/ReduceMean/Add/
  Sqrt/Div, which 8.5 parses (kdtoolkit's export re-exports at 16 for profiles whose oldest TensorRT is 8.5).
- GELU: torch exports ``nn.GELU`` (erf form) as Div/Erf/Add/Mul/Mul; Erf is in the 8.5 table. The ONNX
  ``Gelu`` op (opset 20) is parsed from 10.0 only, one more reason to stay at opset 17.
- Softmax is parsed by every release; attention is MatMul -> (scale) -> Softmax -> MatMul.
- INT8 MatMul: with Q/DQ on both inputs a MatMul runs as an INT8 GEMM under explicit quantization (TensorRT
  developer guide, "Explicit Quantization"; Q/DQ placement rules in kdtoolkit.quant.qdq_rules).
- Fused multi-head attention: the TensorRT 10 developer guide documents an MHA fusion (Myelin) of the
  MatMul -> Softmax -> MatMul pattern; releases before 10 document none, so attention runs as separate
  layers there. Whether an engine fused it is only known from its layer information on the device.
- FP16 overflow (a heuristic, documented as such): TensorRT 8.6 warns at build time that LayerNorm after
  self-attention in FP16 may overflow and advises FP32 LayerNorm or a newer opset. In the opset-16
  decomposition the squared deviation (x - mean)^2 alone overflows FP16 (max 65504) once |x - mean| > 255.9.
  Below TensorRT 11, kdtoolkit's INT8 builds set the FP16 flag too, so unquantized LayerNorm/Softmax may run
  in FP16 for precision int8, fp16 and auto; from 11 (strongly typed) only an FP16-converted ONNX does.
  No activation magnitudes are known statically: the finding is a warning to measure, not a verdict.
"""

from __future__ import annotations

from typing import Any

from kdtoolkit.quant.qdq_rules import Finding, node_label

FP16_MAX = 65504.0
_LN_DECOMP = ("ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div")
_SCALE_OPS = ("Div", "Mul", "Add", "Cast", "Where")  # between the scores MatMul and the Softmax (scale, mask)


def _version(text: str) -> tuple[int, int]:
    from kdtoolkit.backends.trt.version import parse_version

    major, minor, _ = parse_version(text)
    return major, minor


def _graph_maps(model: Any) -> tuple[dict[str, Any], dict[str, list[Any]], set[str]]:
    g = model.graph
    prod = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return prod, readers, consts


def _through_dq(name: str, prod: dict[str, Any]) -> tuple[str, bool]:
    """The tensor behind a DequantizeLinear (and whether there was one)."""
    n = prod.get(name)
    if n is not None and n.op_type == "DequantizeLinear":
        return n.input[0], True
    return name, False


def _is_const(name: str, prod: dict[str, Any], consts: set[str]) -> bool:
    base, _ = _through_dq(name, prod)
    if base in consts:
        return True
    q = prod.get(base)
    return q is not None and q.op_type == "QuantizeLinear" and q.input[0] in consts


def attention_blocks(model: Any) -> list[tuple[Any, Any, Any]]:
    """(scores MatMul, Softmax, context MatMul) triples: Softmax fed (through scale/mask ops and Q/DQ) by a MatMul of two
    activations, and read (through Q/DQ) by a MatMul whose other input is an activation too."""
    prod, readers, consts = _graph_maps(model)
    out = []
    for sm in model.graph.node:
        if sm.op_type != "Softmax":
            continue
        src = prod.get(sm.input[0])
        while src is not None and src.op_type in (*_SCALE_OPS, "DequantizeLinear", "QuantizeLinear"):
            src = prod.get(src.input[0])
        if src is None or src.op_type != "MatMul" or any(_is_const(i, prod, consts) for i in src.input):
            continue
        frontier, ctx = [sm.output[0]], None
        for _ in range(3):
            nxt = []
            for t in frontier:
                for r in readers.get(t, []):
                    if r.op_type == "MatMul" and not any(_is_const(i, prod, consts) for i in r.input):
                        ctx = r
                    elif r.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"):
                        nxt.append(r.output[0])
            if ctx is not None or not nxt:
                break
            frontier = nxt
        if ctx is not None:
            out.append((src, sm, ctx))
    return out


def decomposed_layernorms(model: Any) -> list[Any]:
    """The Pow node of each opset-16 LayerNorm decomposition: ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add -> Sqrt -> Div."""
    prod, readers, _ = _graph_maps(model)
    found = []
    for n in model.graph.node:
        if n.op_type != "Pow":
            continue
        sub = prod.get(n.input[0])
        if sub is None or sub.op_type != "Sub" or (prod.get(sub.input[1]) is None or prod[sub.input[1]].op_type != "ReduceMean"):
            continue
        if any(r.op_type == "ReduceMean" for r in readers.get(n.output[0], [])):
            found.append(n)
    return found


def erf_gelus(model: Any) -> list[Any]:
    """Erf nodes of the exported erf-GELU: Div (by sqrt 2) -> Erf -> Add (1) -> Mul -> Mul (0.5)."""
    prod, readers, _ = _graph_maps(model)
    return [n for n in model.graph.node if n.op_type == "Erf" and (p := prod.get(n.input[0])) is not None and p.op_type in ("Div", "Mul")
            and any(r.op_type == "Add" for r in readers.get(n.output[0], []))]


def is_transformer(model: Any) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "LayerNormalization" in ops or bool(attention_blocks(model)) or bool(decomposed_layernorms(model))


def transformer_findings(model: Any, profile: Any, version: str) -> list[Finding]:
    """Findings for the transformer blocks of ``model`` against TensorRT ``version`` (empty for a graph without them)."""
    if not is_transformer(model):
        return []
    v = _version(version)
    prod, _, consts = _graph_maps(model)
    nodes = list(model.graph.node)
    index = {id(n): i for i, n in enumerate(nodes)}
    native_ln = [n for n in nodes if n.op_type == "LayerNormalization"]
    decomp_ln = decomposed_layernorms(model)
    attn = attention_blocks(model)
    gelus = erf_gelus(model)
    out: list[Finding] = []
    ver = f"TensorRT {version}"
    out.append(Finding("info", "", "transformer.blocks",
                       f"transformer graph: {len(attn)} attention block(s) (MatMul -> Softmax -> MatMul), {len(native_ln)} native and "
                       f"{len(decomp_ln)} decomposed LayerNorm(s), {len(gelus)} erf-GELU(s); checked against {ver}"))
    # LayerNorm: native from 8.6, decomposed before
    if native_ln and v < (8, 6):
        out.append(Finding("info", node_label(native_ln[0], index[id(native_ln[0])]), "transformer.layernorm",
                           f"{len(native_ln)} LayerNormalization node(s) (the unsupported-op errors above): {ver} parses LayerNormalization "
                           "only from 8.6; re-export at "
                           "opset 16, where it decomposes into ReduceMean/Sub/Pow/Sqrt/Div (kdtoolkit export does this for profiles "
                           "whose tensorrt.min_version is 8.5)"))
    elif native_ln:
        out.append(Finding("info", "", "transformer.layernorm",
                           f"{len(native_ln)} LayerNormalization node(s) parsed natively by {ver} (one normalization layer each, from 8.6)"))
    if decomp_ln:
        better = " (from 8.6 an opset-17 export keeps it as one native LayerNormalization)" if v >= (8, 6) else ""
        out.append(Finding("info", node_label(decomp_ln[0], index[id(decomp_ln[0])]), "transformer.layernorm",
                           f"{len(decomp_ln)} LayerNorm(s) decomposed into elementary ops (opset-16 export): {ver} parses them{better}"))
    if gelus:
        out.append(Finding("info", "", "transformer.gelu",
                           f"{len(gelus)} GELU(s) exported as Div/Erf/Add/Mul/Mul: Erf is parsed from 8.5 and the pattern is a pointwise "
                           f"chain {ver} can fuse; the ONNX Gelu op (opset 20) would need TensorRT 10.0+"))
    if attn:
        out.append(Finding("info", "", "transformer.softmax", f"{len(attn)} attention Softmax(es): parsed by {ver} (Softmax is in every table)"))
        if v >= (10, 0):
            out.append(Finding("info", "", "transformer.mha",
                               f"{ver} documents a fused multi-head attention (Myelin MHA fusion) for MatMul -> Softmax -> MatMul; "
                               "whether this engine fuses it shows only in its layer information on the device (never run here)"))
        else:
            out.append(Finding("info", "", "transformer.mha",
                               f"{ver} documents no fused multi-head attention (that fusion is documented from 10.0): each block runs as "
                               "separate GEMM and Softmax layers"))
    # INT8 MatMul: Q/DQ on both inputs
    matmuls = [n for n in nodes if n.op_type == "MatMul"]
    if matmuls and any(n.op_type == "QuantizeLinear" for n in nodes):
        both = [n for n in matmuls if all(_through_dq(i, prod)[1] for i in n.input[:2])]
        act = [n for n in both if not any(_is_const(i, prod, consts) for i in n.input[:2])]
        rest = len(matmuls) - len(both)
        line = (f"{len(both)} of {len(matmuls)} MatMul(s) have Q/DQ on both inputs: INT8 GEMMs under explicit quantization in {ver} "
                f"({len(act)} of them attention MatMuls of two activations)")
        if rest:
            line += f"; {rest} without run in the float precision of the engine"
        out.append(Finding("info", "", "transformer.int8-matmul", line))
    # FP16 overflow heuristic
    strongly_typed = v >= (11, 0)
    fp16 = profile.precision == "fp16" if strongly_typed else profile.precision in ("fp16", "int8", "auto")
    if fp16 and (native_ln or decomp_ln):
        why = ("FP16 engine" if profile.precision == "fp16" else
               f"precision {profile.precision}: below TensorRT 11 kdtoolkit's INT8 build sets the FP16 flag, so the unquantized "
               "LayerNorm and Softmax may run in FP16")
        pow_note = (f"; in the decomposed form (x - mean)^2 overflows FP16 (max {FP16_MAX:.0f}) once |x - mean| > 255.9"
                    if decomp_ln else "")
        out.append(Finding("warning", "", "transformer.fp16-overflow",
                           f"{why}: LayerNorm after attention can overflow in FP16 (TensorRT 8.6+ warns of this at build time){pow_note}. "
                           "Heuristic, not measured: if the engine's accuracy drops, keep the LayerNorm layers in FP32 "
                           "(trtexec --precisionConstraints=obey --layerPrecisions=<norm layers>:fp32) or build FP32"))
    return out
