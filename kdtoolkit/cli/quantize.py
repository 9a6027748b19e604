"""`kdtoolkit quantize`: post-training INT8 (QDQ ONNX) in the profile's scheme, measured on ORT."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import Arch, Data, JsonOut, ModelArg, Out, Profile, TrustPickle


@app.command("quantize")
def quantize_cmd(
    model: ModelArg,
    out: Out,
    data: Data = None,
    profile: Profile = "ort-cpu",
    calib_method: Annotated[Optional[str], typer.Option("--calib-method", help="minmax, entropy, percentile or mse (default: the profile's)")] = None,
    calib_size: Annotated[Optional[int], typer.Option("--calib-size", help="calibration samples from the training split (default: the profile's)")] = None,
    percentile: Annotated[Optional[float], typer.Option("--percentile", help="for --calib-method percentile")] = None,
    reduce_range: Annotated[Optional[bool], typer.Option("--reduce-range/--no-reduce-range", help="7-bit weights (default: the profile's; auto = no VNNI)")] = None,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = None,
) -> None:
    """PTQ: calibrate on the training split, write a QDQ ONNX artifact, report FP32 vs INT8 top-1 on ORT."""
    import tempfile
    from pathlib import Path

    from kdtoolkit import fsutil
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.errors import InputError
    from kdtoolkit.quant.ptq import CALIB_METHODS, build_int8, load_fp32, model_input
    from kdtoolkit.quant.schemes import scheme_for

    if data is None:
        raise InputError("--data is needed: calibration samples come from its training split")
    if calib_method is not None and calib_method not in CALIB_METHODS:
        raise InputError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {calib_method!r}")
    from kdtoolkit.profiles import load_profile

    prof = load_profile(profile)
    method = calib_method or prof.quant.calib_method
    n = calib_size if calib_size is not None else prof.quant.calib_size
    scheme = scheme_for(prof, reduce_range=reduce_range)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, meta, _ = load_fp32(model, arch=arch, trust_pickle=trust_pickle, opset=min(prof.max_opset, 17), work=Path(tmp))
        from kdtoolkit.data import load_data

        _, dims = model_input(fp32)
        size = tuple(meta["input_size"]) if meta.get("input_size") else None
        sp = load_data(data, input_size=size, channels=meta.get("channels"),
                       mean=tuple(meta["mean"]) if meta.get("mean") else None, std=tuple(meta["std"]) if meta.get("std") else None)
        cfg = {"model": str(model), "profile": prof.name, "scheme": scheme.name, "calib_method": method, "calib_size": n,
               "reduce_range": scheme.reduce_range, "data": data}
        with ArtifactWriter(out, kind="onnx", stage="quantize", config=cfg) as w:
            res = build_int8(fp32, w.path("model.onnx"), sp, scheme, method="ptq", calib_method=method, calib_size=n,
                             percentile=percentile or prof.quant.percentile, tolerance_points=prof.accuracy_tolerance)
            w.info.update({"model": {**meta, **sp.spec.to_dict()}, "precision": "int8", "quantization": res["info"],
                           "input": {"name": model_input(w.path("model.onnx"))[0], "shape": dims, "dtype": "float32"}})
            w.metrics.update({**res["metrics"], "precision": "int8",
                              "accuracy_runtime": "onnxruntime-cpu" + (" (proxy for TensorRT)" if prof.is_tensorrt else "")})
    m = w.artifact.metrics
    if json_out:
        fsutil.write_json(json_out, {"onnx": str(out / "model.onnx"), **m, "scheme": scheme.name, "calib_method": method})
    typer.echo(f"wrote {out / 'model.onnx'} (INT8 QDQ, scheme {scheme.name}, {method} calibration on {n} training samples)")
    typer.echo(f"top-1 on {m['n_test']} test images (ONNX Runtime): FP32 {100 * m['accuracy_fp32']:.2f} %, INT8 {100 * m['accuracy_int8']:.2f} % "
               f"({-m['accuracy_drop_points']:+.2f} points)")
    if m.get("kept_in_float"):
        typer.echo(f"kept in float to meet the tolerance: {', '.join(m['kept_in_float'])}")
