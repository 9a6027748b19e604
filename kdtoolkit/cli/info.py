"""`kdtoolkit env` and `kdtoolkit profiles list|show`."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import JsonOut

profiles_app = typer.Typer(help="List and show target profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")


@app.command("env")
def env_cmd(json_out: JsonOut = None) -> None:
    """What this machine can do: torch, ONNX Runtime and its providers, TensorRT, CUDA, CPU flags."""
    from rich.console import Console
    from rich.table import Table

    from kdtoolkit import fsutil
    from kdtoolkit.envinfo import capabilities

    cap = capabilities()
    if json_out:
        fsutil.write_json(json_out, cap)
    t = Table(title="kdtoolkit env", show_header=False)
    for k in ("python", "torch", "torchvision", "onnx", "onnxruntime", "tensorrt", "cuda", "gpu", "torch_threads"):
        t.add_row(k, str(cap.get(k) or "not installed" if cap.get(k) is None and k in ("tensorrt", "torchvision") else cap.get(k)))
    t.add_row("onnxruntime providers", ", ".join(cap["onnxruntime_providers"]) or "none")
    cpu = cap["cpu"]
    t.add_row("cpu", f"{cpu['model']} ({cpu['arch']}, {cpu['logical_cores']} logical cores)")
    t.add_row("cpu flags", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu["flags"].items()))
    if cap.get("jetson"):
        t.add_row("jetson", json.dumps(cap["jetson"]))
    Console().print(t)
    for n in cap["notes"]:
        typer.echo(f"- {n}")


@profiles_app.command("list")
def profiles_list() -> None:
    """The built-in profiles, each with the aliases it answers to (e.g. jetson-agx for jetson-agx-orin)."""
    from kdtoolkit.targets import aliases_of, builtin_names, load_profile

    for name in builtin_names():
        p = load_profile(name)
        typer.echo(f"{name:22s} {p.backend:12s} {p.precision:5s} batch {p.batch.min}-{p.batch.max}  {p.description}")
        if aliases := aliases_of(name):
            typer.echo(f"{'':22s} aliases: {', '.join(aliases)}")
    typer.echo("not supported: the original Jetson Nano, TX1 and TX2 (their last JetPack, 4.6, has TensorRT 8.2; "
               "kdtoolkit needs 8.5 or newer)")


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="profile name or YAML path")], json_out: JsonOut = None,
                  as_json: Annotated[Optional[bool], typer.Option("--as-json", help="print JSON instead of YAML")] = False) -> None:
    """Print a profile with every field resolved."""
    import yaml

    from kdtoolkit import fsutil
    from kdtoolkit.targets import load_profile

    p = load_profile(name)
    if p.requested_as:
        typer.echo(f"profile: {p.requested_as} -> {p.name}", err=True)
    data = p.model_dump(mode="json")
    if json_out:
        fsutil.write_json(json_out, data)
    typer.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False).rstrip())
