"""Load a teacher or student in any supported form.

Forms: a kdtoolkit model artifact folder or checkpoint (recipe + weights), a state dict plus an
architecture name, a TorchScript archive, a ``torch.export`` program, and a full pickled module
only with ``trust_pickle`` (unpickling runs code). ``torch.load(weights_only=True)`` is the default.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdtoolkit.errors import InputError

Form = Literal["eager", "torchscript", "exported", "pickle"]
CKPT_FORMAT = "kdtoolkit.model/1"
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_IGNORABLE_MISSING = ("num_batches_tracked", "channel_index")


@dataclass
class LoadedModel:
    """A model ready for inference, with how it was loaded and what is known about it."""

    module: Any
    form: Form
    source: str
    arch: str | None = None
    recipe: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rewritable(self) -> bool:
        """Eager modules, and exported programs rebuilt as module trees, can be rewritten module by module.

        A TorchScript teacher becomes rewritable through :meth:`as_graph_modules` (it needs the input shape)."""
        from kdtoolkit.models.graph import is_rebuilt

        return self.form in ("eager", "pickle") or (self.form == "exported" and is_rebuilt(self.module))


def as_graph_modules(loaded: LoadedModel, input_shape: tuple[int, ...]) -> LoadedModel:
    """A rewritable copy of a TorchScript or exported teacher: its graph rebuilt as a module tree (see models.graph)."""
    from kdtoolkit.models.graph import mark_rebuilt, modules_from_program, program_from_torchscript

    if loaded.rewritable:
        return loaded
    if loaded.form == "torchscript":
        module = mark_rebuilt(modules_from_program(program_from_torchscript(loaded.module, input_shape)))
    else:
        raise InputError(f"{loaded.source}: the {loaded.form} graph could not be rebuilt as modules for student surgery")
    return LoadedModel(module, "exported", loaded.source, arch=loaded.arch, meta=dict(loaded.meta))


def known_archs() -> list[str]:
    from kdtoolkit.models.zoo import ARCHS

    return ARCHS.names()


def build_arch(name: str, **kwargs: Any):
    """Build an architecture: built-in zoo name, ``torchvision:NAME``, ``timm:NAME``, ``module:callable``, or
    ``hf:CLASS`` with ``config=`` (a transformers classifier rebuilt from its recorded config, see models.vit)."""
    from kdtoolkit.models.zoo import ARCHS

    if name in ARCHS:
        return ARCHS.get(name)(**kwargs)
    prefix, _, rest = name.partition(":")
    if prefix == "torchvision" and rest:
        from kdtoolkit.errors import lazy_import

        tvm = lazy_import("torchvision.models", extra="vision", purpose=f"architecture {name}")
        try:
            return tvm.get_model(rest, weights=None, **kwargs)
        except ValueError:
            raise InputError(f"unknown torchvision model {rest!r}; known: {', '.join(tvm.list_models())}") from None
    if prefix == "timm" and rest:
        from kdtoolkit.models.vit import build_timm

        return build_timm(rest, **kwargs)[0]
    if prefix == "hf" and rest:
        from kdtoolkit.models.vit import build_hf

        return build_hf(rest, **kwargs)
    if ":" in name and rest:
        import importlib

        user_code_importable()
        try:
            fn = getattr(importlib.import_module(prefix), rest)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"cannot import architecture {name!r}: {exc}") from None
        return fn(**_accepted_kwargs(fn, kwargs, name))
    raise InputError(
        f"unknown architecture {name!r}; known: {', '.join(ARCHS.names())}, or torchvision:NAME, timm:NAME, module:callable"
    )


def user_code_importable() -> None:
    """Put the current folder on ``sys.path`` (last, so it shadows nothing installed) for a user's own classes.

    Why: ``python train.py`` and ``python -m`` import from the current folder, so that is where a user's
    ``models.py`` was found when the model was saved; the installed ``kdtoolkit`` console script starts with
    its own bin folder instead, and ``--arch models:Net`` or a trusted pickle of ``models.Net`` failed there
    while the same command worked as ``python -m kdtoolkit``."""
    import sys

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _missing_code(path: Path, exc: BaseException) -> str:
    """One line for a trusted pickle whose class cannot be imported here, with the ways out."""
    import re

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    portable = "or hand over a TorchScript or torch.export file, which need no code"
    attr = re.search(r"Can't get attribute '([^']+)' on <module '([^']+)'", text)
    if attr and attr.group(2) == "__main__":
        return (f"{path}: the pickle needs class {attr.group(1)!r} from the script that saved it (__main__), which no "
                "other program can import; move the class into a module (importable from the current folder or "
                f"PYTHONPATH) and save again, or save a state dict and pass --arch module:Class, {portable}")
    if attr:
        return (f"{path}: module {attr.group(2)!r} was found but has no {attr.group(1)!r} (renamed or moved since the "
                f"model was saved?); use the code the model was saved with, {portable}")
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return (f"{path}: the pickled model needs module {exc.name!r}, which is not importable here: your own code, run "
                f"from the folder that holds it or add that folder to PYTHONPATH; a package, install it; {portable}")
    return f"{path}: cannot unpickle the model ({type(exc).__name__}: {text}); {portable}"


def _accepted_kwargs(fn: Any, kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """Pass only the keyword arguments a user's callable takes (``num_classes`` is optional for it)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _arch_kwargs(name: str, num_classes: int | None, in_channels: int | None,
                 input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Constructor arguments from the data. ``input_size`` (a fresh student only) sizes a zoo ViT's patch grid."""
    import inspect

    from kdtoolkit.models.zoo import ARCHS

    kw: dict[str, Any] = {}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if in_channels is not None and name in ARCHS:
        kw["in_channels"] = in_channels
    if input_size is not None and name in ARCHS and input_size[0] == input_size[1] \
            and "img_size" in inspect.signature(ARCHS.get(name)).parameters:
        kw["img_size"] = int(input_size[0])
    return kw


def extract_state_dict(obj: Any, source: str) -> dict[str, Any]:
    """Find the tensors in a checkpoint: a plain state dict or one nested under a usual key."""
    import torch

    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return extract_state_dict(obj[key], source)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) - 2:
            return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if k in tensors}
    raise InputError(f"{source}: no state dict found (expected a dict of tensors, or one under {', '.join(_STATE_KEYS)})")


def load_weights(model: Any, state: dict[str, Any], source: str, *, strict: bool = True) -> None:
    """Load a state dict, naming missing and unexpected keys in the error instead of torch's wall of text."""
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_IGNORABLE_MISSING)]
    unexpected = [k for k in state if k not in own]
    shape_bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and hasattr(own[k], "shape") and state[k].shape != own[k].shape
    ]
    if strict and (missing or unexpected or shape_bad):
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shape_bad:
            parts.append(f"shape mismatch: {_short(shape_bad)}")
        raise InputError(f"{source} does not match the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def _short(items: list[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _zip_kind(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return None
    names = zipfile.ZipFile(path).namelist()
    tops = {n.split("/", 1)[1] for n in names if "/" in n}
    if "constants.pkl" in tops and any(t.startswith("code/") for t in tops):
        return "torchscript"
    if "archive_format" in tops or "models/model.json" in tops or any(t.endswith("serialized_exported_program.json") for t in tops):
        return "exported"
    return "torch"


def save_checkpoint(path: str | os.PathLike[str], model: Any, recipe: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Write a model as recipe + weights: loadable with weights_only=True and without the teacher's code."""
    from kdtoolkit import fsutil

    state = {k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in model.state_dict().items()}
    return fsutil.torch_save({"format": CKPT_FORMAT, "recipe": recipe, "meta": meta or {}, "state_dict": state}, path)


def save_model(dir_path: str | os.PathLike[str], model: Any, recipe: dict[str, Any] | None, meta: dict[str, Any],
               input_shape: tuple[int, ...]) -> str:
    """Store a model so later stages load it without the user's code; return the file name written.

    With a recipe that rebuilds without the user's code (zoo, torchvision, timm): recipe + weights
    (``model.pt``). Otherwise (a full pickle, TorchScript, ``torch.export`` program, or a user's
    ``module:callable``): a ``torch.export`` program (``model.pt2``), which loads without the user's
    source and without unpickling anything, and is rebuilt as modules on load.
    """
    d = Path(dir_path)
    if recipe is not None and _portable(recipe):
        save_checkpoint(d / "model.pt", model, recipe, meta)
        return "model.pt"
    from kdtoolkit.models.graph import save_program

    save_program(model, d / "model.pt2", input_shape)
    return "model.pt2"


def _portable(recipe: dict[str, Any]) -> bool:
    """Whether a recipe rebuilds without the user's code: the zoo, torchvision, timm and ``hf:`` (config in the recipe) do;
    ``module:callable`` does not."""
    name = str(recipe.get("arch", ""))
    return ":" not in name or name.split(":", 1)[0] in ("torchvision", "timm", "hf")


def build_from_recipe(recipe: dict[str, Any], state: dict[str, Any] | None = None, source: str = "recipe"):
    """Rebuild a (possibly converted and shrunk) model from its recipe, then fit widths to the weights."""
    from kdtoolkit.student.transforms import apply_transforms, fit_to_state_dict

    model = build_arch(recipe["arch"], **recipe.get("arch_kwargs", {}))
    model = apply_transforms(model, recipe.get("transforms", []))
    if state is not None:
        fit_to_state_dict(model, state)
        load_weights(model, state, source)
    return model


def load_model(
    spec: str | os.PathLike[str],
    *,
    arch: str | None = None,
    trust_pickle: bool = False,
    num_classes: int | None = None,
    in_channels: int | None = None,
) -> LoadedModel:
    """Load any supported model form; see the module docstring."""
    import torch

    path = Path(spec)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        from kdtoolkit.artifact import Artifact
        from kdtoolkit.models.vit import is_pretrained_folder, load_pretrained_folder

        if is_pretrained_folder(path):  # a timm or transformers save_pretrained folder: config.json + weights
            return load_pretrained_folder(path)

        art = Artifact.load(path)
        if art.kind != "torch":
            raise InputError(f"{path} is a {art.kind} artifact; a torch model artifact is needed here")
        name = art.info.get("model_file")
        target = art.file(name) if name else art.first_file(".pt")
        loaded = load_model(target, arch=arch or art.info.get("arch"), trust_pickle=trust_pickle, num_classes=num_classes)
        loaded.meta = {**art.info.get("model", {}), **loaded.meta}
        return loaded

    if path.suffix.lower() == ".onnx":
        raise InputError(f"{path} is an ONNX model; this needs the PyTorch model it came from (the student is cut from "
                         "and distilled against torch modules). An ONNX file goes to quantize, check, build and profile")
    if path.suffix == ".safetensors":
        from kdtoolkit.errors import lazy_import

        st = lazy_import("safetensors.torch", purpose=f"loading {path.name}")
        try:
            obj: Any = st.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise InputError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        return _from_state_dict(obj, path, arch, num_classes, in_channels)

    kind = _zip_kind(path)
    if kind == "exported":
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:  # torch raises many types for a bad archive
            raise InputError(f"{path}: cannot load torch.export program ({exc})") from None
        return LoadedModel(_program_module(ep, path), "exported", str(path), arch=arch)
    if kind == "torchscript":
        try:
            mod = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise InputError(f"{path}: cannot load TorchScript ({exc})") from None
        return LoadedModel(mod.eval(), "torchscript", str(path), arch=arch)

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        import pickle

        if not isinstance(exc, pickle.UnpicklingError):
            first = (str(exc).splitlines() or [""])[0]
            raise InputError(f"{path}: not a loadable PyTorch file: truncated, or not a model saved with torch.save / "
                             f"torch.jit.save / torch.export.save ({type(exc).__name__}: {first})") from None
        if not trust_pickle:
            raise InputError(
                f"{path} contains pickled Python objects beyond tensors; unpickling can run arbitrary code. "
                "Pass --trust-pickle only if you trust where this file came from"
            ) from None
        user_code_importable()
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as exc:  # the class the pickle names cannot be found here
            raise InputError(_missing_code(path, exc)) from None
        if isinstance(obj, torch.jit.ScriptModule):
            return LoadedModel(obj.eval(), "torchscript", str(path), arch=arch)
        if isinstance(obj, torch.nn.Module):
            return LoadedModel(obj.eval(), "pickle", str(path), arch=arch or type(obj).__name__)
        # a trusted pickle holding a dict falls through to the state-dict path

    if isinstance(obj, dict) and obj.get("format") == CKPT_FORMAT:
        model = build_from_recipe(obj["recipe"], obj["state_dict"], str(path))
        return LoadedModel(model.eval(), "eager", str(path), arch=obj["recipe"]["arch"], recipe=obj["recipe"], meta=dict(obj.get("meta", {})))

    return _from_state_dict(obj, path, arch, num_classes, in_channels)


def _from_state_dict(obj: Any, path: Path, arch: str | None, num_classes: int | None, in_channels: int | None) -> LoadedModel:
    """A state dict (possibly nested under a usual key) built into ``arch``."""
    state = extract_state_dict(obj, str(path))
    if arch is None:
        raise InputError(f"{path} holds only weights (a state dict); name its architecture with --arch NAME (known: {', '.join(known_archs())})")
    kwargs = _arch_kwargs(arch, num_classes if num_classes is not None else _infer_classes(state), in_channels)
    meta = {k: v for k, v in obj.items() if k not in _STATE_KEYS and isinstance(v, (int, float, str))} if isinstance(obj, dict) else {}
    if arch.startswith("timm:"):
        # a ViT's img_size/patch/channels come from its weights (position embedding, patch projection), so they load as they are
        from kdtoolkit.models.vit import build_timm, geometry

        if in_channels is not None:
            kwargs["in_chans"] = kwargs.pop("in_channels", in_channels)
        model, kwargs = build_timm(arch.split(":", 1)[1], state, **kwargs)
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
        g = geometry(model)
        if g is not None and g["size"] is not None:
            meta["input_size"] = list(g["size"])
    else:
        model = build_arch(arch, **kwargs)
    load_weights(model, state, str(path))
    recipe = {"arch": arch, "arch_kwargs": kwargs, "transforms": []}
    return LoadedModel(model.eval(), "eager", str(path), arch=arch, recipe=recipe, meta=meta)


def _infer_classes(state: dict[str, Any]) -> int | None:
    """The class count from the last 2-D weight (the classifier), so heads of any size load."""
    last = None
    for k, v in state.items():
        if k.endswith("weight") and getattr(v, "ndim", 0) == 2:
            last = v
    return int(last.shape[0]) if last is not None else None


def _program_module(ep: Any, path: Path) -> Any:
    """The exported program as a trainable module tree; if its graph cannot be split, a frozen module."""
    from kdtoolkit.models.graph import mark_rebuilt, modules_from_program

    try:
        return mark_rebuilt(modules_from_program(ep))
    except Exception:  # a graph we cannot split (custom ops, shared weights): still usable for inference
        import torch

        module = ep.module()
        # eval()/train() raise on an exported module unless told how to switch batch norm and dropout
        allow = getattr(torch.ao.quantization, "allow_exported_model_train_eval", None)  # gone from newer torch (2.14)
        if allow is not None:
            allow(module)
        return module
