"""Shared option aliases, so every command spells model, data, profile and output the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

ModelArg = Annotated[str, typer.Argument(help="model file (state dict, TorchScript, torch.export .pt2, kdtoolkit checkpoint) or artifact folder")]
Arch = Annotated[Optional[str], typer.Option("--arch", help="architecture for a state-dict model: zoo name, torchvision:NAME, timm:NAME, module:callable")]
TrustPickle = Annotated[bool, typer.Option("--trust-pickle", help="allow unpickling a full module (this runs code from the file)")]
Data = Annotated[Optional[str], typer.Option("--data", help="ImageFolder dir, .tar.gz of one, .npz, or a built-in name (mnist-mini)")]
Profile = Annotated[str, typer.Option("--profile", help="target profile name (kdtoolkit profiles list) or YAML path")]
Out = Annotated[Path, typer.Option("--out", help="output folder")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="also write the result as JSON here")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
Set = Annotated[Optional[list[str]], typer.Option(
    "--set", help="set any config field by its dotted name, e.g. --set train.lr=0.01 (repeatable; value read as YAML; "
                  "validated against the config models, applied after the other options)")]


# --- options derived from the configs (kdtoolkit.config) ----------------------------------------
# An option that sets a config field takes its help text (the Field description), its type and its
# default from the pydantic model, and sits in the --help panel named after that model. The option's
# name stays the command's own (user-facing names do not change); ``note`` adds what only the flag
# means (e.g. "0 = off"). Everything else is reachable with --set KEY=VALUE.
PANELS = {"StudentConfig": "Student", "TrainConfig": "Training", "LossConfig": "Training", "QatConfig": "Quantization",
          "Int8Config": "Quantization", "DataConfig": "Data", "MeasureConfig": "Measurement"}


def _field(model: type, name: str):
    try:
        return model.model_fields[name]
    except KeyError:
        raise KeyError(f"{model.__name__} has no field {name!r}") from None


def config_help(model: type, name: str, note: str | None = None) -> str:
    """The help text of the option that sets ``model.name``: the field's description (+ ``note``)."""
    from typing import Literal, get_args, get_origin

    f = _field(model, name)
    desc = f.description or name.replace("_", " ")
    if get_origin(f.annotation) is Literal and not note:
        *head, last = (str(a) for a in get_args(f.annotation))
        note = f"{', '.join(head)} or {last}" if head else last
    return f"{desc} ({note})" if note else desc


def config_panel(model: type) -> str:
    """The --help panel of the options that set fields of ``model`` (Student, Training, ...)."""
    return PANELS.get(model.__name__, model.__name__.removesuffix("Config") or model.__name__)


def config_type(model: type, name: str, optional: bool = False) -> Any:
    """The Python type typer parses the option as, from the field's annotation: a Literal is a str (the config
    validates it, in one line), ``X | None`` stays optional; ``optional=True`` makes it optional (no default
    on the command: unset means 'keep the config's')."""
    import types
    from typing import Literal, Union, get_args, get_origin

    ann = _field(model, name).annotation
    args = get_args(ann)
    if get_origin(ann) in (Union, types.UnionType) and type(None) in args:
        optional, ann = True, next(a for a in args if a is not type(None))
    if get_origin(ann) is Literal:
        ann = type(get_args(ann)[0])
    if ann not in (int, float, bool, str):
        raise TypeError(f"{model.__name__}.{name} ({ann}) is not a plain option type; set it with --set")
    return Optional[ann] if optional else ann


def config_default(model: type, name: str) -> Any:
    """The field's default: the command's default, so a flag left out means what the config means."""
    return _field(model, name).get_default(call_default_factory=True)


def config_option(model: type, name: str, *flags: str, note: str | None = None, optional: bool = False,
                  panel: str | None = None, **kw: Any) -> Any:
    """``Annotated[type, typer.Option(*flags, help=..., rich_help_panel=...)]`` for field ``name`` of the
    pydantic config ``model``; ``flags`` default to ``--field-name``. Type, help and panel come from the model,
    so a changed description or type shows in every command's --help."""
    flags = flags or ("--" + name.replace("_", "-"),)
    return Annotated[config_type(model, name, optional), typer.Option(
        *flags, help=config_help(model, name, note), rich_help_panel=panel or config_panel(model), **kw)]


def validation_line(exc: Any) -> str:
    """A pydantic ValidationError as the one line users see: the field, the value a flag or file gave it, why."""
    e = exc.errors()[0]
    where, msg = ".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")
    if not where:
        return msg
    return f"{where}: required" if e["type"] == "missing" else f"{where}={e.get('input')!r}: {msg}"


def _bad_image_option() -> Any:
    from kdtoolkit.config import DataConfig

    return config_option(DataConfig, "on_bad_image", note="fail names the file")


BadImage = _bad_image_option()  # every command that reads --data takes it


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


def parse_keep_blocks(text: str | None) -> dict[str, int] | None:
    """``layer1=0,layer3=4`` -> {"layer1": 0, "layer3": 4} (blocks kept per named stage)."""
    if text is None:
        return None
    from kdtoolkit.errors import InputError

    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, n = part.partition("=")
        if not eq or not name.strip() or not n.strip().isdigit():
            raise InputError(f"--keep-blocks takes STAGE=N pairs, comma-separated (e.g. layer1=0,layer3=4), got {text!r}")
        out[name.strip()] = int(n)
    return out


KeepBlocks = Annotated[Optional[str], typer.Option(
    "--keep-blocks", help="blocks kept in named stages, over --depth there, e.g. layer1=0,layer3=4 (0 removes a stage "
                          "whose blocks all keep their input's shape)")]


# --- the model input: one spelling on every command (DESIGN.md "CLI conventions") ---------------
# --input-shape C,H,W is canonical; --input-size is its alias and also takes H,W (with --channels),
# the spelling compress used first. Resolution order: these flags, the model's metadata, the zoo
# entry, the data (kdtoolkit.data.inputspec.resolve_input).
InputShape = Annotated[Optional[str], typer.Option("--input-shape", "--input-size",
                                                   help="model input C,H,W (or H,W, or one size S for S,S, with --channels); default: the model's metadata, its zoo entry, else the data")]
Channels = Annotated[Optional[int], typer.Option("--channels", help="model input channels (part of --input-shape)")]
Mean = Annotated[Optional[str], typer.Option("--mean", help="normalisation mean per channel, e.g. 0.485,0.456,0.406 (default: the model's metadata, else measured from the data)")]
Std = Annotated[Optional[str], typer.Option("--std", help="normalisation std per channel, e.g. 0.229,0.224,0.225")]
ClassNames = Annotated[Optional[str], typer.Option("--class-names", help="comma-separated class order (default: the model's metadata, else sorted folder names)")]


def parse_input_flags(input_shape: str | None = None, channels: int | None = None, mean: str | None = None,
                      std: str | None = None, class_names: str | None = None):
    """Parse the input flags into ``InputFlags``, failing in one line that names the flag at fault.

    ``input_shape`` is C,H,W (or H,W, or S for a square S,S: --input-size 224); ``x`` also separates.
    """
    from kdtoolkit.data.inputspec import InputFlags
    from kdtoolkit.errors import InputError

    size: tuple[int, int] | None = None
    ch = channels
    dims = parse_ints(input_shape, "--input-shape")
    if dims is not None:
        if len(dims) == 3:
            if channels is not None and channels != dims[0]:
                raise InputError(f"--channels {channels} contradicts --input-shape {input_shape} ({dims[0]} channels); give one of them")
            ch, size = dims[0], (dims[1], dims[2])
        elif len(dims) == 2:
            size = (dims[0], dims[1])
        elif len(dims) == 1:  # one size is a square input, as timm's --img-size 224 and torchvision's resize mean it
            size = (dims[0], dims[0])
        else:
            raise InputError(f"--input-shape must be C,H,W, H,W or one size S for S,S, got {input_shape!r}")
        if min(dims) < 1:
            raise InputError(f"--input-shape values must be positive, got {input_shape!r}")
    if ch is not None and ch < 1:
        raise InputError(f"--channels must be at least 1, got {ch}")
    m = parse_floats(mean, "--mean")
    s = parse_floats(std, "--std")
    if s is not None and min(s) <= 0:
        raise InputError(f"--std values must be positive, got {std!r}")
    for flag, v in (("--mean", m), ("--std", s)):
        if v is not None and ch is not None and len(v) != ch:
            raise InputError(f"{flag} has {len(v)} value(s) but the input has {ch} channel(s); give {ch} comma-separated values")
    if m is not None and s is not None and len(m) != len(s):
        raise InputError(f"--mean has {len(m)} value(s) but --std has {len(s)}; give one per channel in both")
    names = [c.strip() for c in class_names.split(",") if c.strip()] if class_names else None
    return InputFlags(channels=ch, input_size=size, mean=m, std=s, classes=names)


def resolve_model_input(flags, loaded, arch: str | None = None):
    """``resolve_input`` for a loaded model (``LoadedModel``): its metadata, architecture and weights."""
    from kdtoolkit.data.inputspec import resolve_input

    module = loaded.module if getattr(loaded, "rewritable", False) else None
    return resolve_input(flags, dict(loaded.meta), arch or getattr(loaded, "arch", None), module=module)
