"""Commands for single stages: `student`, `export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import Arch, JsonOut, ModelArg, Out, TrustPickle, parse_ints


@app.command("export")
def export_cmd(
    model: ModelArg,
    out: Out,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    profile: Annotated[Optional[str], typer.Option("--profile", help="take the opset and batch range from this profile")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default 17: the newest JetPack 5/6.0 TensorRT accepts)")] = None,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="fixed batch dimension instead of a dynamic one")] = False,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="C,H,W (default: from the model's metadata)")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="real inputs for the parity check")] = None,
    json_out: JsonOut = None,
) -> None:
    """Export to ONNX (dynamic batch, checked, simplified) with a parity check against PyTorch."""
    from kdtoolkit import fsutil
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.errors import InputError
    from kdtoolkit.export.onnx_export import export_onnx, opset_of, parity, simplify
    from kdtoolkit.models.loading import load_model

    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    meta = loaded.meta
    shape = parse_ints(input_shape, "--input-shape")
    if shape is None:
        if "input_size" not in meta:
            raise InputError("the model carries no input size; give --input-shape C,H,W")
        shape = (meta["channels"], *meta["input_size"])
    if len(shape) != 3:
        raise InputError("--input-shape must be C,H,W")
    prof = None
    if profile:
        from kdtoolkit.profiles import load_profile

        prof = load_profile(profile)
    chosen = opset or (min(prof.max_opset, 17) if prof else 17)
    if chosen > 17:
        typer.echo(f"note: opset {chosen} is newer than the TensorRT 8.5/8.6 parsers of JetPack 5 and 6.0 accept (17)", err=True)
    with ArtifactWriter(out, kind="onnx", stage="export", config={"opset": chosen, "static_batch": static_batch}) as w:
        raw = w.dir / ".raw.onnx"
        export_onnx(loaded.module, (1, *shape), raw, opset=chosen, dynamic_batch=not static_batch)
        w.info["simplify"] = simplify(raw, w.path("model.onnx"))
        raw.unlink()
        if data:
            from kdtoolkit.data import load_data

            sp = load_data(data, input_size=tuple(shape[1:]), channels=shape[0], mean=tuple(meta["mean"]) if meta.get("mean") else None,
                           std=tuple(meta["std"]) if meta.get("std") else None)
            w.metrics["parity"] = parity(loaded.module, w.path("model.onnx"), sp.test, sp.spec)
        w.info.update({"model": meta, "opset": opset_of(w.path("model.onnx"))})
    res = {"onnx": str(out / "model.onnx"), **w.artifact.metrics, "opset": w.artifact.info["opset"], **w.artifact.info["simplify"]}
    if json_out:
        fsutil.write_json(json_out, res)
    typer.echo(f"wrote {out / 'model.onnx'} (opset {res['opset']}, nodes {res['nodes_before']} -> {res['nodes_after']})")
    if "parity" in res:
        p = res["parity"]
        typer.echo(f"parity on {p['n']} test images: max |diff| {p['max_abs_diff']:.2e}, top-1 agreement {100 * p['top1_agreement']:.2f} %")
