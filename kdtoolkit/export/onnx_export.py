"""Export to ONNX with a dynamic batch axis, check it, simplify it, and compare it with PyTorch.

The TorchScript-based exporter (``dynamo=False``) is used by default because it emits opset 17
directly; torch's dynamo exporter starts at opset 18 and its down-conversion fails on common
graphs, while the TensorRT 8.5/8.6 parsers of JetPack 5 and 6.0 accept no newer than 17.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.errors import InputError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
JETPACK_MAX_OPSET = 17  # newest opset the TensorRT 8.5/8.6 parsers of JetPack 5 and 6.0 accept


def choose_opset(requested: int | None, profile_max: int | None = None) -> int:
    """The opset to export at: the one asked for, else the profile's maximum capped at 17."""
    if requested is not None:
        return requested
    return min(profile_max or JETPACK_MAX_OPSET, JETPACK_MAX_OPSET)


# Ops that an older TensorRT parser cannot import but that torch decomposes at a lower opset:
# LayerNormalization is an ONNX op from opset 17 and a TensorRT parser op from 8.6 (onnx-tensorrt
# operators.md); at opset 16 torch writes it as ReduceMean/Sub/Pow/Sqrt/Div, which 8.5 parses.
DECOMPOSE_BELOW: dict[str, tuple[tuple[int, int], int]] = {"LayerNormalization": ((8, 6), 16)}


def opset_for_target(onnx_path: str | os.PathLike[str], opset: int, trt_min_version: str | None) -> tuple[int, str | None]:
    """The opset to re-export at so the oldest TensorRT of a profile parses the graph, and why (or the same opset, None)."""
    if trt_min_version is None:
        return opset, None
    import onnx

    from kdtoolkit.backends.trt.version import parse_version

    ops = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    oldest = parse_version(trt_min_version)[:2]
    for op, (since, lower) in DECOMPOSE_BELOW.items():
        if op in ops and oldest < since and opset > lower:
            return lower, (f"{op} is parsed by TensorRT {since[0]}.{since[1]}+ only and the profile's oldest is {trt_min_version}: "
                           f"exported at opset {lower}, where it decomposes into elementary ops")
    return opset, None


def export_onnx(
    module: Any,
    input_shape: tuple[int, ...],
    path: str | os.PathLike[str],
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
    output_names: list[str] | None = None,
) -> Path:
    """Write ``module`` as ONNX (atomically) and run the ONNX checker and shape inference on it.

    ``output_names``: the names of a model whose outputs are not class logits (a dict's keys, output0..); every
    output gets its name and, with ``dynamic_batch``, a dynamic batch axis."""
    import torch

    from kdtoolkit import fsutil
    from kdtoolkit.models.vit import check_input

    module = module.eval() if hasattr(module, "eval") else module
    check_input(module, tuple(input_shape[2:]))  # a ViT's patch grid, in one line rather than an exporter trace
    example = torch.zeros(*input_shape)
    outs = list(output_names or [output_name])
    dyn = {input_name: {0: "batch"}, **{o: {0: "batch"} for o in outs}} if dynamic_batch else None
    with fsutil.atomic_path(path, suffix=".onnx") as tmp:
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module, (example,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[input_name], output_names=outs, dynamic_axes=dyn, do_constant_folding=True,
                )
        except Exception as exc:
            raise InputError(f"ONNX export failed: {_export_error(exc)}") from None
        check_onnx(tmp)
    return Path(path)


def _export_error(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    first = next((m for m in msg if m.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {first[:300]}"


def check_onnx(path: str | os.PathLike[str]) -> Any:
    """onnx.checker (full) and strict shape inference; raise one clear line on failure."""
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise InputError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0][:300]})") from None
    return model


def simplify(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Simplify with onnxslim (constant folding, dead-node and redundant-op removal); keep the result checked."""
    import onnx
    import onnxslim

    from kdtoolkit import fsutil

    before = onnx.load(str(src))
    slim = onnxslim.slim(before)
    with fsutil.atomic_path(dst, suffix=".onnx") as tmp:
        onnx.save(slim, str(tmp))
        check_onnx(tmp)
    return {"nodes_before": len(before.graph.node), "nodes_after": len(slim.graph.node), "simplifier": f"onnxslim {onnxslim.__version__}"}


def opset_of(path_or_model: Any) -> int:
    import onnx

    m = onnx.load(str(path_or_model)) if not hasattr(path_or_model, "opset_import") else path_or_model
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def parity(module: Any, onnx_path: str | os.PathLike[str], data: Any, spec: Any, *, limit: int | None = 2000,
           output_names: list[str] | None = None) -> dict[str, Any]:
    """Compare PyTorch and ONNX Runtime logits on real inputs: max abs difference and top-1 agreement.

    With ``output_names`` (outputs that are not class logits): max |diff| per output, no top-1 agreement."""
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.evaluate import output_fidelity, predict

    if limit is not None and len(data) > limit:
        data = data.subset(np.arange(limit))
    if output_names is not None:
        fid = output_fidelity(predict(module, data, spec, all_outputs=True), predict(make_session(onnx_path), data, spec, all_outputs=True),
                              output_names)
        return {"n": int(len(data)), "max_abs_diff": max((f["max_abs_diff"] for f in fid.values()), default=0.0),
                "top1_agreement": None, "by_output": {n: f["max_abs_diff"] for n, f in fid.items()}}
    ref = predict(module, data, spec)
    got = predict(make_session(onnx_path), data, spec)
    return {
        "n": int(len(data)),
        "max_abs_diff": float(np.abs(ref - got).max()) if len(data) else 0.0,
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()) if len(data) else 1.0,
    }


def export_artifact(module: Any, input_shape: tuple[int, ...], out_dir: str | os.PathLike[str], *, opset: int, config: dict[str, Any],
                    model_meta: dict[str, Any], dynamic_batch: bool = True, parents: list[Any] | None = None, input_key: str = "",
                    trt_min_version: str | None = None, test: Any = None, spec: Any = None, carry_metrics: dict[str, Any] | None = None,
                    log: Any = None, output_names: list[str] | None = None) -> Any:
    """The export stage's artifact, used by ``compress`` (stages 03/04) and ``kdtoolkit export`` alike: ONNX
    exported (re-exported at a lower opset where ``trt_min_version``'s parser needs it), checked, simplified,
    compared against the torch model on ``test`` when given, and described (opset, input, output, model meta)."""
    from kdtoolkit.artifact import ArtifactWriter

    say = log or (lambda msg: None)
    with ArtifactWriter(out_dir, kind="onnx", stage="export", config=config, parents=parents or [], input_key=input_key) as w:
        raw = w.dir / ".raw.onnx"
        export_onnx(module, input_shape, raw, opset=opset, dynamic_batch=dynamic_batch, output_names=output_names)
        if trt_min_version is not None:
            lower, why = opset_for_target(raw, opset, trt_min_version)
            if why:
                say(why)
                export_onnx(module, input_shape, raw, opset=lower, dynamic_batch=dynamic_batch, output_names=output_names)
                w.info["opset_note"] = why
        w.info["simplify"] = simplify(raw, w.path("model.onnx"))
        raw.unlink()
        if test is not None:
            w.metrics["parity"] = parity(module, w.path("model.onnx"), test, spec, output_names=output_names)
        import onnx

        m = onnx.load(str(w.path("model.onnx")), load_external_data=False)
        init = {t.name for t in m.graph.initializer}
        dims = [[d.dim_value if d.dim_value > 0 else (d.dim_param or "batch") for d in v.type.tensor_type.shape.dim]
                for v in [next(i for i in m.graph.input if i.name not in init), *m.graph.output]]
        w.info.update({"model": model_meta, "opset": opset_of(m), "precision": "fp32",
                       "input": {"name": INPUT_NAME, "shape": dims[0], "dtype": "float32"},
                       "output": {"name": m.graph.output[0].name, "shape": dims[1], "dtype": "float32"}})
        if output_names is not None:  # not class logits: every output described, and the kind said
            w.info["outputs"] = {"kind": "raw", "names": [o.name for o in m.graph.output],
                                 "tensors": [{"name": o.name, "shape": d, "dtype": "float32"} for o, d in zip(m.graph.output, dims[1:])]}
        w.metrics.update(carry_metrics or {})
    return w.artifact
