"""Commands for TensorRT targets: `check` (static, runs anywhere) and `build` (needs TensorRT)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import BadImage, JsonOut, Out, Profile

OnnxArg = Annotated[str, typer.Argument(help="ONNX file, or an artifact folder or bundle holding one (export / optimize / quantize output)")]


def _onnx_path(arg: str) -> Path:
    from kdtoolkit.artifact import Artifact
    from kdtoolkit.bundle.common import bundle_manifest
    from kdtoolkit.errors import InputError

    p = Path(arg)
    if p.is_dir():
        bundle = bundle_manifest(p)
        if bundle is not None:  # a bundle: the ONNX it ships (check it, or build its engine, on the device)
            onnx = p / ((bundle.get("runtime") or {}).get("onnx") or (bundle.get("model") or {}).get("file") or "model/model.onnx")
            if not onnx.is_file():
                raise InputError(f"{p}: bundle has no ONNX at {onnx.relative_to(p)}")
            return onnx
        return Artifact.load(p).first_file(".onnx")
    if not p.is_file():
        raise InputError(f"ONNX file not found: {arg}")
    return p


@app.command("check")
def check_cmd(
    onnx: OnnxArg,
    profile: Profile,
    json_out: JsonOut = None,
    tensorrt_version: Annotated[Optional[str], typer.Option("--tensorrt-version", help="check against this TensorRT parser (default: the profile's tensorrt.min_version)")] = None,
) -> None:
    """Static check of an ONNX file against a target profile (ops, Q/DQ, shapes, opset, DLA layers); no TensorRT needed."""
    from kdtoolkit import fsutil
    from kdtoolkit.backends.check import check_file
    from kdtoolkit.errors import CheckFailed
    from kdtoolkit.targets import load_profile

    prof = load_profile(profile)
    rep = check_file(_onnx_path(onnx), prof, tensorrt_version=tensorrt_version)
    for line in rep.lines():
        typer.echo(line)
    typer.echo(rep.summary())
    if json_out:
        fsutil.write_json(json_out, rep.to_dict())
    if not rep.ok:
        raise CheckFailed(f"{rep.errors} error-severity finding(s): {rep.onnx} will not build as profile {prof.name} asks")


@app.command("build")
def build_cmd(
    onnx: OnnxArg,
    profile: Profile,
    out: Out,
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="calibration data for implicit INT8: dataset (ImageFolder, .npz, built-in name) or .npy of preprocessed N,C,H,W inputs")] = None,
    calib_cache: Annotated[Optional[str], typer.Option("--calib-cache", help="existing TensorRT calibration cache to reuse")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="int8, fp16, fp32 or auto (default: the profile's)")] = None,
    timing_cache: Annotated[Optional[str], typer.Option("--timing-cache", help="timing cache file reused across builds (default: per TensorRT version in the kdtoolkit cache)")] = None,
    on_bad_image: BadImage = "fail",
    json_out: JsonOut = None,
) -> None:
    """Build a TensorRT engine (raw plan + manifest) for the profile; needs TensorRT on this machine."""
    from kdtoolkit import fsutil
    from kdtoolkit.backends.trt.builder import build_engine
    from kdtoolkit.targets import load_profile

    prof = load_profile(profile)
    art = build_engine(onnx, prof, out, calib_data=calib_data, precision=precision, timing_cache=timing_cache,
                       calib_cache=calib_cache, log=lambda m: typer.echo(m, err=True), on_bad_image=on_bad_image)
    res = {"engine": str(art.path / art.info["plan"]), **art.metrics, "precision": art.info["precision"],
           "tensorrt": art.info["tensorrt"]["version"]}
    if json_out:
        fsutil.write_json(json_out, res)
    typer.echo(f"wrote {res['engine']} (TensorRT {res['tensorrt']}, {res['precision']}, built in {res['build_time_s']:.1f} s)")
