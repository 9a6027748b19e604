"""One resolution order for a model's input size and normalisation, used by every command.

Order per field (DESIGN.md): the flags, else the model's metadata (or what its weights show: the
first convolution's input channels, a static ONNX input), else the zoo entry of its architecture,
else the data. The data comes last because its statistics are only a guess at the model's own:
calibrating the fine-tuned ResNet-56 with them instead of its ImageNet mean/std cost 1.8 points.
Every field keeps where it came from, so manifests and notes can say so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kdtoolkit.errors import InputError

if TYPE_CHECKING:
    from kdtoolkit.data.datasets import DataSpec, Splits

FIELDS = ("channels", "input_size", "mean", "std", "classes")
# the flag that sets each field, named in errors; compress spells them the same way
FLAG_NAMES = {"channels": "--input-shape", "input_size": "--input-shape", "mean": "--mean", "std": "--std",
              "classes": "--class-names"}


@dataclass
class InputFlags:
    """What the user gave on the command line (already parsed; None = not given)."""

    channels: int | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None

    def to_data_config(self) -> dict[str, Any]:
        """The matching ``pipeline.DataConfig`` fields (compress stores flags there)."""
        return {"input_size": self.input_size, "channels": self.channels, "mean": self.mean, "std": self.std,
                "class_names": list(self.classes) if self.classes else None}

    @classmethod
    def from_data_config(cls, d: Any) -> InputFlags:
        return cls(channels=d.channels, input_size=tuple(d.input_size) if d.input_size else None,
                   mean=tuple(d.mean) if d.mean else None, std=tuple(d.std) if d.std else None,
                   classes=list(d.class_names) if d.class_names else None)


@dataclass
class InputSpec:
    """The model's input as resolved; ``source[field]`` says where each value came from
    ("flag", "model", "zoo <arch>", "torchvision <name> weights", "timm <name> pretrained_cfg", "data")."""

    channels: int | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    classes: list[str] | None = None
    source: dict[str, str] = field(default_factory=dict)
    # the size an architecture's published weights use (torchvision/timm 224x224): weaker than the
    # data, so it applies only where no data is given (export or student without --data)
    fallback_size: tuple[int, int] | None = None
    fallback_source: str = ""

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None, *, source: str = "model") -> InputSpec:
        """The one parser of a model's ``meta`` (and of a manifest's ``info.model``): channels,
        input_size, mean, std and classes, each None where the metadata has none."""
        meta = meta or {}
        spec = cls(channels=int(meta["channels"]) if meta.get("channels") else None,
                   input_size=_tuple(meta.get("input_size"), int), mean=_tuple(meta.get("mean"), float),
                   std=_tuple(meta.get("std"), float),
                   classes=[str(c) for c in meta["classes"]] if meta.get("classes") else None)
        spec.source = {k: source for k in FIELDS if getattr(spec, k) is not None}
        return spec

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """C, H, W when both channels and size are known."""
        if self.channels is None or self.input_size is None:
            return None
        return (int(self.channels), int(self.input_size[0]), int(self.input_size[1]))

    def require_shape(self, hint: str = "") -> tuple[int, int, int]:
        """C, H, W, taking the fallback size when nothing stronger gave one; else a one-line error."""
        if self.input_size is None and self.fallback_size is not None:
            self.input_size = self.fallback_size
            self.source["input_size"] = f"{self.fallback_source} (default size)"
        s = self.shape
        if s is None:
            missing = "input size" if self.input_size is None else "input channels"
            raise InputError(f"the model carries no {missing}; give --input-shape C,H,W{hint}")
        return s

    def normalisation_measured(self) -> bool:
        return self.source.get("mean") == "data" or self.source.get("std") == "data"

    def to_meta(self, *, include_measured: bool = True) -> dict[str, Any]:
        """Keys for an artifact's info["model"] (the model metadata every later stage reads).

        ``include_measured=False`` leaves out a mean/std measured from the data: an artifact that was
        not trained or calibrated with them must not pass a guess on as the model's own values.
        """
        out: dict[str, Any] = {}
        src: dict[str, str] = {}
        for k in FIELDS:
            v = getattr(self, k)
            if v is None:
                continue
            if k in ("mean", "std") and not include_measured and self.source.get(k) == "data":
                continue
            out[k] = list(v) if isinstance(v, (tuple, list)) else v
            src[k] = self.source.get(k, "")
        if src:
            out["input_source"] = src
        return out


def _tuple(v: Any, kind: type) -> tuple | None:
    if v is None:
        return None
    if isinstance(v, (int, float, str)):
        v = [v]
    try:
        return tuple(kind(x) for x in v)
    except (TypeError, ValueError):
        return None


def first_conv_channels(module: Any) -> int | None:
    """Input channels of the first 2-D convolution of an eager module (what its weights accept)."""
    try:
        import torch

        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                return int(m.in_channels)
    except (AttributeError, ImportError, RuntimeError):
        return None
    return None


def arch_defaults(arch: str | None) -> tuple[dict[str, Any], str]:
    """What an architecture name itself says about its input, offline only: (values, source label).

    Zoo entries carry their own (every ``cifar_*`` is 3x32x32). For ``torchvision:`` and ``timm:``
    the normalisation of the architecture's published weights is used (ImageNet mean/std); their
    size only where the architecture fixes it (a ViT's patch grid): a convolutional classifier with
    global pooling takes any size, and its 224x224 default would wrongly resize the user's data.
    """
    if not arch:
        return {}, ""
    from kdtoolkit.models.zoo import arch_input

    zoo = arch_input(arch)
    if zoo is not None:
        return dict(zoo), f"zoo {arch}"
    prefix, _, name = arch.partition(":")
    if prefix == "torchvision" and name:
        return _torchvision_defaults(name), f"torchvision {name} weights"
    if prefix == "timm" and name:
        return _timm_defaults(name), f"timm {name} pretrained_cfg"
    return {}, ""


def _torchvision_defaults(name: str) -> dict[str, Any]:
    try:
        import torchvision.models as tvm

        weights = tvm.get_model_weights(name).DEFAULT
        tf = weights.transforms()
    except Exception:  # no torchvision, no weights enum for this name, or an old version: nothing known
        return {}
    out: dict[str, Any] = {}
    mean, std = getattr(tf, "mean", None), getattr(tf, "std", None)
    if mean and std:
        out.update(channels=len(mean), mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    crop = getattr(tf, "crop_size", None)
    min_size = tuple(weights.meta.get("min_size", ()) or ())
    if crop:
        size = (int(crop[0]), int(crop[-1]))
        if min_size and tuple(min_size) == size:  # the architecture accepts only this size (ViT)
            out["input_size"] = size
        else:
            out["fallback_size"] = size
    return out


def _timm_defaults(name: str) -> dict[str, Any]:
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # timm missing or the name has no pretrained config: nothing known
        return {}
    if cfg is None:
        return {}
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    out: dict[str, Any] = {}
    mean, std, size = get("mean"), get("std"), get("input_size")
    if mean and std:
        out.update(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    if size and len(size) == 3:
        out["channels"] = int(size[0])
        key = "input_size" if get("fixed_input_size", False) else "fallback_size"
        out[key] = (int(size[1]), int(size[2]))
    return out


def resolve_input(flags: InputFlags | None, meta: dict[str, Any] | None, arch: str | None,
                  data_spec: DataSpec | None = None, *, module: Any = None) -> InputSpec:
    """Resolve channels, input size, mean, std and classes: flags, model metadata, zoo entry, data.

    ``module`` (an eager model) lets its first convolution stand for the channel count when the
    metadata has none. Raises a one-line InputError naming the flag that fixes a contradiction.
    """
    flags = flags or InputFlags()
    meta = meta or {}
    zoo, zoo_label = arch_defaults(arch)
    from_meta = InputSpec.from_meta(meta)
    model_vals: dict[str, Any] = {k: getattr(from_meta, k) for k in FIELDS}
    if model_vals["channels"] is None and module is not None:
        model_vals["channels"] = first_conv_channels(module)
    data_vals: dict[str, Any] = {}
    if data_spec is not None:
        data_vals = {"channels": data_spec.channels, "input_size": tuple(data_spec.input_size), "mean": tuple(data_spec.mean),
                     "std": tuple(data_spec.std), "classes": list(data_spec.classes)}
    spec = InputSpec()
    for k in FIELDS:
        for label, vals in (("flag", vars(flags)), ("model", model_vals), (zoo_label, zoo), ("data", data_vals)):
            v = vals.get(k)
            if v is not None and label:
                setattr(spec, k, tuple(v) if isinstance(v, (list, tuple)) and k != "classes" else v)
                spec.source[k] = label
                break
    # an architecture's published mean/std are for its published channel count: a model built with other
    # channels (a 1-channel timm ViT) falls back to the data's statistics rather than contradicting itself
    for k in ("mean", "std"):
        v = getattr(spec, k)
        if zoo_label and spec.source.get(k) == zoo_label and spec.channels is not None and v is not None and len(v) != spec.channels:
            dv = data_vals.get(k)
            setattr(spec, k, tuple(dv) if dv is not None else None)
            spec.source.pop(k)
            if dv is not None:
                spec.source[k] = "data"
    # a model whose weights take C channels cannot be fed another count
    if zoo.get("fallback_size"):
        spec.fallback_size, spec.fallback_source = tuple(zoo["fallback_size"]), zoo_label
    conv = first_conv_channels(module) if module is not None else None
    if flags.channels is not None and conv is not None and conv != flags.channels:
        raise InputError(f"--input-shape gives {flags.channels} channel(s) but the model's first convolution takes {conv}")
    _check(spec)
    return spec


def _check(spec: InputSpec) -> None:
    """Contradictions in one line, naming the flag that fixes them."""
    if spec.input_size is not None and (len(spec.input_size) != 2 or min(spec.input_size) < 1):
        raise InputError(f"--input-shape must be C,H,W with positive sizes, got input size {spec.input_size}")
    if spec.channels is not None and spec.channels < 1:
        raise InputError(f"--input-shape must give at least 1 channel, got {spec.channels}")
    for k in ("mean", "std"):
        v = getattr(spec, k)
        if v is None or spec.channels is None or len(v) == spec.channels:
            continue
        where = spec.source.get(k)
        ch_from = spec.source.get("channels")
        if where == "flag":
            raise InputError(f"--{k} has {len(v)} value(s) but the model input has {spec.channels} channel(s) "
                             f"(from {_said(ch_from)}); give {spec.channels} comma-separated values")
        raise InputError(f"the {k} from {_said(where)} has {len(v)} value(s) but the input has {spec.channels} channel(s) "
                         f"(from {_said(ch_from)}); give --mean and --std with {spec.channels} values each")
    if spec.std is not None and min(spec.std) <= 0:
        where = "--std" if spec.source.get("std") == "flag" else f"the std from {_said(spec.source.get('std'))} (give --std)"
        raise InputError(f"{where} values must be positive, got {','.join(f'{v:g}' for v in spec.std)}")


def _said(source: str | None) -> str:
    return {"flag": "the flags", "model": "the model's metadata", "data": "the data"}.get(source or "", source or "unknown")


def note_measured(spec: InputSpec, *, stream: Any = None) -> str | None:
    """Say in one line (stderr) that the normalisation is a guess, when it is; return that line."""
    labels = {spec.source.get("mean"), spec.source.get("std")}
    if "data" in labels and spec.mean and spec.std:
        line = (f"note: normalisation measured from the data (mean {_fmt(spec.mean)}, std {_fmt(spec.std)}); "
                "pass --mean/--std if the model was trained with other values")
    elif any(s and (s.startswith("torchvision ") or s.startswith("timm ")) for s in labels) and spec.mean and spec.std:
        line = (f"note: normalisation taken from {spec.source.get('mean')} (mean {_fmt(spec.mean)}, std {_fmt(spec.std)}); "
                "pass --mean/--std if the model was trained with other values")
    else:
        return None
    print(line, file=stream or sys.stderr, flush=True)
    return line


def _fmt(v: tuple[float, ...]) -> str:
    return ",".join(f"{x:.3f}" for x in v)


def load_splits(source: str, spec: InputSpec, *, note: bool = True, **load_kw: Any) -> Splits:
    """Load ``source`` mapped to the resolved input, fill what only the data knows, and attach the
    final spec as ``splits.input``. Class order comes from the model's metadata when it has one.

    ``load_kw`` goes to ``load_data`` (seed, limits, fractions, on_bad_image).
    """
    from kdtoolkit.data.datasets import load_data

    known_ch = spec.channels is not None
    sp = load_data(source, input_size=spec.input_size, channels=spec.channels,
                   mean=spec.mean if known_ch else None, std=spec.std if known_ch else None,
                   class_names=spec.classes if spec.source.get("classes") == "flag" else None, **load_kw)
    final = replace(spec, source=dict(spec.source))
    for k, v in (("channels", sp.spec.channels), ("input_size", tuple(sp.spec.input_size)), ("mean", tuple(sp.spec.mean)),
                 ("std", tuple(sp.spec.std))):
        if getattr(final, k) is None:
            setattr(final, k, v)
            final.source[k] = "data"
    _check(final)
    n_data = len(sp.spec.classes)
    if final.classes is None:
        final.classes, final.source["classes"] = list(sp.spec.classes), "data"
    elif len(final.classes) != n_data:
        if final.source.get("classes") == "flag":
            raise InputError(f"--class-names gives {len(final.classes)} names but the data has {n_data} classes")
        raise InputError(f"the model has {len(final.classes)} outputs (classes in its metadata) but the data has {n_data} classes")
    sp.spec.mean, sp.spec.std, sp.spec.classes = tuple(final.mean), tuple(final.std), list(final.classes)
    sp.input = final
    if note:
        note_measured(final)
    return sp
