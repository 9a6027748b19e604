"""`kdtoolkit quantize`: post-training INT8 (QDQ ONNX) in the profile's scheme, measured on ORT."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import (
    Arch,
    BadImage,
    Channels,
    Data,
    InputShape,
    JsonOut,
    Mean,
    ModelArg,
    Out,
    Profile,
    Std,
    TrustPickle,
    config_option,
    config_panel,
)
from kdtoolkit.config import Int8Config


@app.command("quantize")
def quantize_cmd(
    model: ModelArg,
    out: Out,
    data: Data = None,
    on_bad_image: BadImage = "fail",
    profile: Profile = "ort-cpu",
    calib_method: config_option(Int8Config, "calib_method", note="minmax, entropy, percentile or mse; default: the profile's", optional=True) = None,
    calib_size: config_option(Int8Config, "calib_size", note="default: the profile's", optional=True) = None,
    percentile: config_option(Int8Config, "percentile", optional=True) = None,
    int8_mode: config_option(Int8Config, "mode", "--int8-mode", note="default: the profile's (auto: dynamic for a transformer on ONNX Runtime, else static)", optional=True) = None,
    reduce_range: Annotated[Optional[bool], typer.Option("--reduce-range/--no-reduce-range", help="7-bit weights (default: the profile's; auto = no VNNI)",
                                                         rich_help_panel=config_panel(Int8Config))] = None,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    input_shape: InputShape = None,
    channels: Channels = None,
    mean: Mean = None,
    std: Std = None,
    json_out: JsonOut = None,
) -> None:
    """PTQ: calibrate on the training split, write a QDQ ONNX artifact, report FP32 vs INT8 top-1 on ORT.

    MODEL may be an ONNX file or artifact, or any torch form (a state dict with --arch too): a torch
    model is exported first, at the input size the flags, its metadata, its zoo entry or the data give."""
    import tempfile
    from pathlib import Path

    from kdtoolkit import fsutil
    from kdtoolkit.cli.options import parse_input_flags
    from kdtoolkit.errors import InputError
    from kdtoolkit.quant.artifact import write_quantized
    from kdtoolkit.quant.ptq import CALIB_METHODS, model_input
    from kdtoolkit.quant.schemes import scheme_for

    flags = parse_input_flags(input_shape, channels, mean, std)
    if data is None:
        raise InputError("--data is needed: calibration samples come from its training split")
    if calib_method is not None and calib_method not in CALIB_METHODS:
        raise InputError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {calib_method!r}")
    from kdtoolkit.targets import load_profile

    prof = load_profile(profile, {"quant.mode": int8_mode} if int8_mode else None)
    method = calib_method or prof.quant.calib_method
    n = calib_size if calib_size is not None else prof.quant.calib_size
    scheme = scheme_for(prof, reduce_range=reduce_range)
    # validated now, before the data is read: a bad --calib-size or --percentile is one line at once
    int8 = Int8Config(method="ptq", calib_method=method, calib_size=n, percentile=percentile or prof.quant.percentile,
                      tolerance_points=prof.accuracy_tolerance)
    with tempfile.TemporaryDirectory() as tmp:
        from kdtoolkit.data.inputspec import load_splits

        fp32, meta, module = _fp32_source(model, arch, trust_pickle)
        if fp32 is not None:
            _, dims = model_input(fp32)
            static = [d if isinstance(d, int) and d > 0 else None for d in dims[1:]]
            if len(static) == 3 and all(static):  # a static ONNX input is the model's own size
                meta = {"channels": static[0], "input_size": static[1:], **meta}
        from kdtoolkit.data.inputspec import resolve_input

        spec = resolve_input(flags, meta, arch or (module.arch if module is not None else None),
                             module=module.module if module is not None and module.rewritable else None)
        sp = load_splits(data, spec, on_bad_image=on_bad_image)
        spec = sp.input
        if fp32 is None:  # a torch model: export it at the resolved input
            from kdtoolkit.export.onnx_export import export_onnx, simplify

            raw = Path(tmp) / "raw.onnx"
            export_onnx(module.module, (1, *spec.require_shape()), raw, opset=min(prof.max_opset, 17))
            simplify(raw, Path(tmp) / "fp32.onnx")
            fp32 = Path(tmp) / "fp32.onnx"
        from kdtoolkit.quant.ptq import resolve_mode

        mode, _ = resolve_mode(prof.quant.mode, prof.backend, fp32)
        cfg = {"model": str(model), "profile": prof.name, "scheme": scheme.name, "mode": mode, "calib_method": method, "calib_size": n,
               "reduce_range": scheme.reduce_range, "data": data, "input": {k: v for k, v in spec.to_meta().items() if k != "classes"}}
        # the INT8 model was calibrated with these statistics: record them, measured or not, with their source
        art = write_quantized(out, fp32, sp, prof, int8.model_copy(update={"mode": mode}), config=cfg, scheme=scheme, policy="int8",
                              asked_by="kdtoolkit quantize", info={"model": {**meta, **sp.spec.to_dict(), **spec.to_meta()}})
    m = art.metrics
    if json_out:
        fsutil.write_json(json_out, {"onnx": str(out / "model.onnx"), **m, "scheme": scheme.name, "calib_method": method})
    if mode == "dynamic":
        typer.echo(f"wrote {out / 'model.onnx'} (dynamic INT8: int8 MatMul/Gemm weights, activation ranges at run time; scheme {scheme.name})")
    else:
        typer.echo(f"wrote {out / 'model.onnx'} (INT8 QDQ, scheme {scheme.name}, {method} calibration on {n} training samples)")
    typer.echo(f"top-1 on {m['n_test']} test images (ONNX Runtime): FP32 {100 * m['accuracy_fp32']:.2f} %, INT8 {100 * m['accuracy_int8']:.2f} % "
               f"({-m['accuracy_drop_points']:+.2f} points)")
    if m.get("kept_in_float"):
        typer.echo(f"kept in float to meet the tolerance: {', '.join(m['kept_in_float'])}")


def _fp32_source(model: str, arch: str | None, trust_pickle: bool):
    """(ONNX path or None, model metadata, LoadedModel or None): an ONNX file or artifact as it is,
    anything else loaded as a torch model to be exported at the resolved input."""
    from pathlib import Path

    from kdtoolkit.artifact import Artifact
    from kdtoolkit.errors import InputError
    from kdtoolkit.export.onnx_export import check_onnx

    p = Path(model)
    if not p.exists():
        raise InputError(f"model not found: {p}")
    if p.suffix.lower() == ".onnx":
        check_onnx(p)
        return p, {}, None
    if p.is_dir() and Artifact.is_artifact(p) and Artifact.load(p).kind == "onnx":
        art = Artifact.load(p)
        f = art.file("model.onnx")
        check_onnx(f)
        return f, dict(art.info.get("model", {})), None
    from kdtoolkit.models.loading import load_model

    loaded = load_model(p, arch=arch, trust_pickle=trust_pickle)
    return None, dict(loaded.meta), loaded
