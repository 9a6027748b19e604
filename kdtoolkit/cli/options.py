"""Shared option aliases, so every command spells model, data, profile and output the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[str, typer.Argument(help="model file (state dict, TorchScript, torch.export .pt2, kdtoolkit checkpoint) or artifact folder")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="architecture for a state-dict model: zoo name, torchvision:NAME, timm:NAME, module:callable")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="allow unpickling a full module (this runs code from the file)")]
Data = Annotated[Optional[str], typer.Option("--data", help="ImageFolder dir, .tar.gz of one, .npz, or a built-in name (mnist-mini)")]
Profile = Annotated[str, typer.Option("--profile", help="target profile name (kdtoolkit profiles list) or YAML path")]
Out = Annotated[Path, typer.Option("--out", help="output folder")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="also write the result as JSON here")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]


def parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    from kdtoolkit.errors import InputError

    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    from kdtoolkit.errors import InputError

    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
