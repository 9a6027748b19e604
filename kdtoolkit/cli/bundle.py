"""`kdtoolkit bundle` and `kdtoolkit verify`: hand a finished run over, and check a bundle on arrival."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app


@app.command("bundle")
def bundle_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished compress run folder (RUN with NN-stage folders and summary.json)")],
    out: Annotated[Path, typer.Option("--out", help="bundle folder to write (or .tar.gz with --tar)")],
    tar: Annotated[bool, typer.Option("--tar", help="write one .tar.gz instead of a folder")] = False,
    data: Annotated[Optional[str], typer.Option("--data", help="the run's data, if it moved (for the reference images)")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, max=256, help="reference test images to include")] = 16,
    name: Annotated[Optional[str], typer.Option("--name", help="model name (Triton entry); default ARCH-PROFILE")] = None,
    test_subset: Annotated[int, typer.Option("--test-subset", min=0, help="also pack N seeded test images with their ONNX Runtime top-1, "
                                                                         "for device_report.py on a device without the data (1000 or more)")] = 0,
    on_bad_image: Annotated[Optional[str], typer.Option("--on-bad-image", help="fail or skip on unreadable images (default: the run's)")] = None,
) -> None:
    """Bundle the run's deployable model with its manifest, reference batch, Triton entry, report and deploy scripts."""
    from kdtoolkit.bundle import make_bundle

    path = make_bundle(run_dir, out, tar=tar, data=data, samples=samples, name=name, test_subset=test_subset, on_bad_image=on_bad_image)
    typer.echo(f"bundle written: {path}")
    typer.echo(f"check it with: kdtoolkit verify {path}")


@app.command("verify")
def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="bundle folder or .tar.gz")],
    runtime: Annotated[Optional[str], typer.Option("--runtime", help="onnxruntime or tensorrt (default: the manifest's)")] = None,
) -> None:
    """Re-check every hash, the manifest version, and the reference outputs on the manifest's runtime (exit 1 on any failure)."""
    from kdtoolkit.bundle import verify_bundle
    from kdtoolkit.errors import InputError

    if runtime not in (None, "onnxruntime", "tensorrt"):
        raise InputError(f"--runtime must be onnxruntime or tensorrt, got {runtime!r}")
    results = verify_bundle(bundle, runtime=runtime, emit=typer.echo)
    typer.echo(f"bundle OK: {len(results)} checks passed")
