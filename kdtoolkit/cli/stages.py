"""Commands for single stages: `student`, `export`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import (
    Arch,
    BadImage,
    Channels,
    InputShape,
    JsonOut,
    KeepBlocks,
    Mean,
    ModelArg,
    Out,
    Std,
    TrustPickle,
    parse_keep_blocks,
)


@app.command("export")
def export_cmd(
    model: ModelArg,
    out: Out,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    profile: Annotated[Optional[str], typer.Option("--profile", help="take the opset and batch range from this profile")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default 17: the newest JetPack 5/6.0 TensorRT accepts)")] = None,
    static_batch: Annotated[bool, typer.Option("--static-batch", help="fixed batch dimension instead of a dynamic one")] = False,
    input_shape: InputShape = None,
    channels: Channels = None,
    mean: Mean = None,
    std: Std = None,
    data: Annotated[Optional[str], typer.Option("--data", help="real inputs for the parity check (and the input size when nothing else gives it)")] = None,
    on_bad_image: BadImage = "fail",
    json_out: JsonOut = None,
) -> None:
    """Export to ONNX (dynamic batch, checked, simplified) with a parity check against PyTorch."""
    from kdtoolkit import fsutil
    from kdtoolkit.cli.options import parse_input_flags, resolve_model_input
    from kdtoolkit.export.onnx_export import JETPACK_MAX_OPSET, choose_opset, export_artifact
    from kdtoolkit.models.loading import load_model

    flags = parse_input_flags(input_shape, channels, mean, std)
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    meta = dict(loaded.meta)
    spec = resolve_model_input(flags, loaded, arch)
    sp = None
    if data:
        from kdtoolkit.data.inputspec import load_splits

        sp = load_splits(data, spec, on_bad_image=on_bad_image)
        spec = sp.input
    shape = spec.require_shape(" (or --data)")
    prof = None
    if profile:
        from kdtoolkit.targets import load_profile

        prof = load_profile(profile)
    chosen = choose_opset(opset, prof.max_opset if prof else None)
    if chosen > JETPACK_MAX_OPSET:
        typer.echo(f"note: opset {chosen} is newer than the TensorRT 8.5/8.6 parsers of JetPack 5 and 6.0 accept (17)", err=True)
    # the export stage's own function: `kdtoolkit export` writes the manifest stage 04-export writes
    # (mean/std travel with the model; a mean/std measured here for the parity check is no fact about it)
    art = export_artifact(loaded.module, (1, *shape), out, opset=chosen, config={"opset": chosen, "static_batch": static_batch},
                          model_meta={**meta, **spec.to_meta(include_measured=False)}, dynamic_batch=not static_batch,
                          trt_min_version=prof.tensorrt.min_version if opset is None and prof is not None and prof.tensorrt else None,
                          test=sp.test if sp is not None else None, spec=sp.spec if sp is not None else None,
                          log=lambda m: typer.echo(f"note: {m}", err=True))
    res = {"onnx": str(out / "model.onnx"), **art.metrics, "opset": art.info["opset"], **art.info["simplify"]}
    if json_out:
        fsutil.write_json(json_out, res)
    typer.echo(f"wrote {out / 'model.onnx'} (opset {res['opset']}, nodes {res['nodes_before']} -> {res['nodes_after']})")
    if "parity" in res:
        p = res["parity"]
        typer.echo(f"parity on {p['n']} test images: max |diff| {p['max_abs_diff']:.2e}, top-1 agreement {100 * p['top1_agreement']:.2f} %")


@app.command("student")
def student_cmd(
    model: ModelArg,
    out: Out,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    profile: Annotated[str, typer.Option("--profile", help="target profile: its backend measures latency")] = "ort-cpu",
    student_arch: Annotated[Optional[str], typer.Option("--student-arch", help="build this architecture instead of converting the teacher")] = None,
    depth: Annotated[float, typer.Option("--depth", help="fraction of repeated blocks kept per stage")] = 1.0,
    width: Annotated[float, typer.Option("--width", help="fraction of channels kept (dependency-graph pruning)")] = 1.0,
    keep_blocks: KeepBlocks = None,
    no_separable: Annotated[bool, typer.Option("--no-separable", help="keep standard convs")] = False,
    skip_stem: Annotated[bool, typer.Option("--skip-stem/--convert-stem", help="keep the first conv standard")] = True,
    skip_first: Annotated[int, typer.Option("--skip-first", help="keep the first N convertible convs standard")] = 0,
    skip: Annotated[Optional[str], typer.Option("--skip", help="comma-separated module names/patterns to keep standard")] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="comma-separated stages to convert (e.g. layer2,layer3)")] = None,
    init: Annotated[str, typer.Option("--init", help="svd (teacher-initialised rank-1) or random")] = "svd",
    latency_budget: Annotated[Optional[float], typer.Option("--latency-budget", help="ms at the profile's opt batch: search depth x width")] = None,
    speedup: Annotated[Optional[float], typer.Option("--speedup", help="search depth x width for the most capable student at least X times faster than the teacher (default: 2x when the separable student is not)")] = None,
    blocks: Annotated[Optional[int], typer.Option("--blocks", help="transformer teacher: blocks the student keeps (default: from --depth)")] = None,
    heads: Annotated[Optional[int], typer.Option("--heads", help="transformer teacher: attention heads per block (default: from --width)")] = None,
    mlp_hidden: Annotated[Optional[int], typer.Option("--mlp-hidden", help="transformer teacher: MLP hidden units per block (default: from --width)")] = None,
    block_select: Annotated[str, typer.Option("--block-select", help="transformer teacher: uniform (TinyBERT's spacing) or cosine (needs --data)")] = "uniform",
    data: Annotated[Optional[str], typer.Option("--data", help="a few batches to re-estimate BatchNorm after surgery")] = None,
    on_bad_image: BadImage = "fail",
    input_shape: InputShape = None,
    channels: Channels = None,
    mean: Mean = None,
    std: Std = None,
    batches: Annotated[str, typer.Option("--batch", help="batch sizes to time, comma-separated")] = "1,64",
    json_out: JsonOut = None,
) -> None:
    """Build a student from the teacher and show params, MACs and measured latency against it."""
    from rich.console import Console
    from rich.table import Table

    from kdtoolkit import fsutil
    from kdtoolkit.cli.options import parse_input_flags, resolve_model_input
    from kdtoolkit.config import StudentConfig
    from kdtoolkit.errors import InputError
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.stages import derive_student, write_student
    from kdtoolkit.student.search import latency_table
    from kdtoolkit.targets import load_profile

    if init not in ("svd", "random"):
        raise InputError("--init must be svd or random")
    flags = parse_input_flags(input_shape, channels, mean, std)
    prof = load_profile(profile)
    teacher = load_model(model, arch=arch, trust_pickle=trust_pickle)
    meta = dict(teacher.meta)
    spec = resolve_model_input(flags, teacher, arch)
    calib = None
    if data:
        from kdtoolkit.data import batches as data_batches
        from kdtoolkit.data.inputspec import load_splits

        sp = load_splits(data, spec, on_bad_image=on_bad_image)
        spec = sp.input
        meta = {**sp.spec.to_dict(), **meta}
        calib = data_batches(sp.train, sp.spec, 64, shuffle=True)
    # the student keeps the teacher's input; a mean/std measured from the data is not recorded as its own
    meta = {k: v for k, v in meta.items() if k not in ("mean", "std") or spec.source.get(k) != "data"}
    meta.update(spec.to_meta(include_measured=False))
    full_shape = (1, *spec.require_shape(" (or --data)"))
    import torch

    with torch.no_grad():
        n_cls = int(teacher.module(torch.zeros(full_shape)).shape[-1])
    cfg = StudentConfig(arch=student_arch, separable=not no_separable, skip_stem=skip_stem, skip_first=skip_first,
                        skip=skip.split(",") if skip else [], only=only.split(",") if only else [], depth=depth, width=width,
                        keep_blocks=parse_keep_blocks(keep_blocks) or {},
                        init=init, latency_budget_ms=latency_budget, speedup=speedup, blocks=blocks, heads=heads,
                        mlp_hidden=mlp_hidden, block_select=block_select)
    # the student stage's own functions: `kdtoolkit student` writes what stage 01-student writes
    teacher_mod, student, recipe, info, cfg, found = derive_student(teacher, cfg, prof, full_shape, n_cls, calib)
    bs = [int(b) for b in batches.split(",")]
    if not teacher_mod.rewritable and not hasattr(teacher_mod.module, "parameters"):
        raise InputError("cannot time this teacher form; give a state dict + --arch")
    table = latency_table(teacher_mod.module, student.eval(), full_shape, bs, threads=prof.onnxruntime.intra_op_threads)
    runtime = "onnxruntime-cpu" + (" (proxy: TensorRT is not on this machine)" if prof.is_tensorrt else "")
    result = {**table, "latency_runtime": runtime, "profile": prof.name, "surgery": {k: v for k, v in info.items() if k not in ("converted", "search", "resolved_config")},
              "converted": info.get("converted", []), "recipe": recipe}
    if found is not None:
        result["search"] = info["search"]
    write_student(out, student, recipe, meta, full_shape, info, config=cfg.model_dump(mode="json"), metrics={"latency": table})
    if json_out:
        fsutil.write_json(json_out, result)
    if found is not None and found.get("candidates"):
        goal = " and ".join(filter(None, [f"{found['budget_ms']:g} ms" if found.get("budget_ms") else None,
                                          f"{found['speedup_target']:g}x" if found.get("speedup_target") else None])) or "the target"
        t = Table(title=f"candidates within {goal} at batch {found['batch']} ({runtime})")
        int8 = any("p50_int8_ms" in r for r in found["candidates"])  # INT8 in the speed budget: both figures shown
        for c in ("candidate", "params", "MACs", "p50 (ms)", *(("FP32 / INT8 (ms)",) if int8 else ()), "meets"):
            t.add_column(c)
        for r in found["candidates"]:
            both = (f"{r['p50_fp32_ms']:.3f} / {r['p50_int8_ms']:.3f}",) if int8 else ()
            t.add_row(r["name"] + (" *" if r["name"] == found["chosen"] else ""), f"{r['params']:,}", f"{r['macs']:,}", f"{r['p50_ms']:.3f}",
                      *both, "yes" if r["meets_budget"] else "no")
        Console().print(t)
    t = Table(title=f"teacher vs student on {prof.name} ({runtime}, both in FP32)")
    for c in ["model", "params", "MACs"] + [f"p50 b{b} (ms)" for b in bs]:
        t.add_column(c, justify="right")
    for name in ("teacher", "student"):
        r = table[name]
        t.add_row(name, f"{r['params']:,}", f"{r['macs']:,}", *[f"{r['latency_by_batch'][str(b)]['p50']:.3f}" for b in bs])
    t.add_row("speedup", f"{table['teacher']['params'] / table['student']['params']:.1f}x", f"{table['teacher']['macs'] / table['student']['macs']:.1f}x",
              *[f"{table['speedup'][f'b{b}']:.2f}x" for b in bs])
    Console().print(t)
    typer.echo(f"student written to {out} ({len(info.get('converted', []))} convs made separable)")
