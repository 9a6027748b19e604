"""Vision transformers as teachers: timm ViT/DeiT state dicts, timm folders and Hugging Face folders.

Why a module of its own: a ViT's input size is fixed by its weights (the position embedding holds one
vector per patch), so loading one means reading img_size, patch size, channels and classes from the
weights or from the folder's config.json rather than from the architecture's defaults; a Hugging Face
model returns an output object, so it is wrapped to return logits; and a wrong input size must fail in
one line before any work, not as a shape error deep in attention. Nothing is ever downloaded: timm
models are built with ``pretrained=False``, transformers loads with ``local_files_only=True`` under
``HF_HUB_OFFLINE=1``; weights come only from the user's files.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_PREFIX = "hf:"


# ----------------------------------------------------------------------------- geometry


def timm_state_kwargs(state: dict[str, Any]) -> dict[str, Any]:
    """``img_size``, ``patch_size`` and ``in_chans`` of a timm ViT-family state dict (empty when it is not one).

    The patch embedding's kernel gives the patch size and channels; the position embedding's token count
    (with or without the class/distillation/register tokens) gives the square patch grid."""
    proj = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if proj is None or getattr(proj, "ndim", 0) != 4:
        return {}
    out: dict[str, Any] = {"in_chans": int(proj.shape[1])}
    ph, pw = int(proj.shape[2]), int(proj.shape[3])
    out["patch_size"] = ph if ph == pw else (ph, pw)
    if pos is not None and getattr(pos, "ndim", 0) == 3:
        tokens = int(pos.shape[1])
        prefix = sum(int(state[k].shape[1]) for k in ("cls_token", "dist_token", "reg_token") if k in state)
        for n in (tokens - prefix, tokens):
            g = math.isqrt(max(n, 0))
            if n > 0 and g * g == n:
                out["img_size"] = (g * ph, g * pw)
                break
    return out


def geometry(module: Any) -> dict[str, Any] | None:
    """Patch size and fixed input size (None when the model takes any multiple) of a ViT-like module, else None.

    Knows timm's PatchEmbed, the Hugging Face wrapper, and a user's own class: a patchify Conv2d (kernel ==
    stride > 1) together with a ``pos_embed``/``position_embedding(s)`` parameter of shape 1 x tokens x dim."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return None
    if isinstance(module, HFLogitsBase):
        cfg = module.model.config
        p, s = getattr(cfg, "patch_size", None), getattr(cfg, "image_size", None)
        if p is None:
            return None
        return {"patch": _pair(p), "size": _pair(s) if s else None, "source": f"config.json of {type(module.model).__name__}"}
    pe = getattr(module, "patch_embed", None)
    if pe is not None and hasattr(pe, "patch_size"):
        fixed = getattr(pe, "strict_img_size", True) and not getattr(pe, "dynamic_img_pad", False) \
            and not getattr(module, "dynamic_img_size", False)
        size = getattr(pe, "img_size", None)
        return {"patch": _pair(pe.patch_size), "size": _pair(size) if fixed and size is not None else None,
                "source": f"timm {type(module).__name__}"}
    if not isinstance(module, torch.nn.Module):
        return None
    conv = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == m.stride and max(m.kernel_size) > 1),
                None)
    if conv is None:
        return None
    pos = None
    for name, prm in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("pos_embed", "position_embedding", "position_embeddings", "pos_embedding") and prm.ndim == 3 and prm.shape[0] == 1:
            pos = prm
            break
    if pos is None:
        return None
    patch = (int(conv.kernel_size[0]), int(conv.kernel_size[1]))
    size = None
    for n in (int(pos.shape[1]) - 1, int(pos.shape[1])):
        g = math.isqrt(max(n, 0))
        if n > 0 and g * g == n:
            size = (g * patch[0], g * patch[1])
            break
    return {"patch": patch, "size": size, "source": type(module).__name__}


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def check_input(module: Any, input_size: tuple[int, int] | None, *, flag: str = "--input-shape") -> None:
    """One line, before any work, when a ViT cannot take ``input_size``: not a multiple of its patch size, or not the
    size its position embedding was trained for."""
    if input_size is None:
        return
    g = geometry(module)
    if g is None:
        return
    h, w = int(input_size[0]), int(input_size[1])
    ph, pw = g["patch"]
    if h % ph or w % pw:
        raise InputError(f"input size {h}x{w} is not a multiple of the ViT's patch size {ph}x{pw} ({g['source']}); "
                         f"give {flag} C,H,W with H and W multiples of {ph if ph == pw else (ph, pw)}")
    if g["size"] is not None and tuple(g["size"]) != (h, w):
        gh, gw = g["size"]
        raise InputError(f"the ViT's position embedding is for {gh}x{gw} inputs ({gh // ph}x{gw // pw} patches of {ph}x{pw}, "
                         f"{g['source']}) but the input is {h}x{w}; drop {flag} (images are resized to the model's size) or give {gh}x{gw}")


def is_vit_arch(name: str) -> bool:
    """Whether an architecture name builds a vision transformer (timm ViT/DeiT families, or a Hugging Face ViT class)."""
    prefix, _, rest = name.partition(":")
    if prefix == "timm" and rest:
        base = rest.split(".", 1)[0]
        return base.startswith(("vit_", "deit_", "deit3_", "eva02_", "flexivit_", "beit_", "samvit_", "test_vit"))
    if prefix == "hf" and rest:
        return any(k in rest for k in ("ViT", "Vit", "DeiT", "Beit", "Dinov2"))
    return False


# ----------------------------------------------------------------------------- timm


def build_timm(name: str, state: dict[str, Any] | None = None, **kwargs: Any):
    """``timm.create_model(name, pretrained=False)``; for a ViT-family state dict, its img_size/patch/channels fill
    what ``kwargs`` leaves open (so the position embedding and patch projection load as they are)."""
    from kdtoolkit.errors import lazy_import

    timm = lazy_import("timm", extra="vit", purpose=f"architecture timm:{name}")
    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r} (timm {timm.__version__})")
    geo = timm_state_kwargs(state) if state is not None else {}
    if geo and not timm_accepts_geometry(name):
        geo = {}
    kw = {**geo, **kwargs}
    try:
        return timm.create_model(name, pretrained=False, **kw), kw
    except (TypeError, AssertionError, ValueError) as exc:
        raise InputError(f"timm cannot build {name} with {kw}: {str(exc).splitlines()[0][:200]}") from None


def timm_accepts_geometry(name: str) -> bool:
    """Whether ``name``'s timm entry point takes img_size/patch_size/in_chans (the ViT families do)."""
    return is_vit_arch(f"timm:{name}")


def _load_timm_folder(path: Path, cfg: dict[str, Any]) -> Any:
    from kdtoolkit.errors import lazy_import
    from kdtoolkit.models.loading import LoadedModel, load_weights

    arch = str(cfg["architecture"])
    timm = lazy_import("timm", extra="vit", purpose=f"{path} (a timm folder)")
    if not timm.is_model(arch):  # before the weights are read: the architecture is what the user must fix
        raise InputError(f"{path}: unknown timm model {arch!r} in config.json (timm {timm.__version__})")
    state = _read_weights(path)
    args = dict(cfg.get("model_args") or {})
    if cfg.get("num_classes") is not None:
        args["num_classes"] = int(cfg["num_classes"])
    if "img_size" in args and isinstance(args["img_size"], list):
        args["img_size"] = tuple(args["img_size"])
    model, kw = build_timm(arch, state, **args)
    load_weights(model, state, str(path))
    pcfg = cfg.get("pretrained_cfg") or {}
    meta: dict[str, Any] = {}
    size = pcfg.get("input_size")
    g = geometry(model)
    if g is not None and g["size"] is not None:
        meta["input_size"] = list(g["size"])
    elif size and len(size) == 3 and pcfg.get("fixed_input_size"):
        meta["input_size"] = [int(size[1]), int(size[2])]
    if size and len(size) == 3:
        meta["channels"] = int(size[0])
    if pcfg.get("mean") and pcfg.get("std"):
        meta["mean"], meta["std"] = [float(v) for v in pcfg["mean"]], [float(v) for v in pcfg["std"]]
    labels = pcfg.get("label_names") or cfg.get("label_names")
    if labels and len(labels) == getattr(model, "num_classes", -1):
        meta["classes"] = [str(c) for c in labels]
    recipe = {"arch": f"timm:{arch}", "arch_kwargs": _jsonable(kw), "transforms": []}
    return LoadedModel(model.eval(), "eager", str(path), arch=f"timm:{arch}", recipe=recipe, meta=meta)


def _jsonable(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}


# ----------------------------------------------------------------------------- Hugging Face


def _transformers(purpose: str):
    # offline before the hub client reads its settings; a user's explicit setting is kept
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from kdtoolkit.errors import lazy_import

    return lazy_import("transformers", extra="vit", purpose=purpose)


def _hf_class(name: str, purpose: str):
    tf = _transformers(purpose)
    if not name.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")):
        raise InputError(f"{purpose}: architecture {name!r} is not an image classifier (expected a *ForImageClassification class)")
    cls = getattr(tf, name, None)
    if cls is None:
        raise InputError(f"{purpose}: unknown architecture {name!r} (transformers {tf.__version__} has no such class)")
    return cls


class HFLogitsBase:
    """Marker for the wrapper (defined lazily: torch is imported only when a Hugging Face model is used)."""


@functools.cache
def _wrapper_cls():
    import torch

    class HFLogits(torch.nn.Module, HFLogitsBase):
        """A transformers image classifier that returns its logits tensor (exportable, distillable like any classifier)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=x).logits

    return HFLogits


def build_hf(name: str, config: dict[str, Any]):
    """Rebuild a transformers classifier from its config dict (no files, no download): the recipe of ``hf:NAME``."""
    cls = _hf_class(name, f"architecture {HF_PREFIX}{name}")
    cfg = cls.config_class.from_dict(dict(config))
    return _wrapper_cls()(cls(cfg).eval())


def _load_hf_folder(path: Path, cfg: dict[str, Any]) -> Any:
    from kdtoolkit.models.loading import LoadedModel

    archs = cfg.get("architectures") or []
    if not archs:
        raise InputError(f"{path}/config.json names no architecture (no \"architectures\" for transformers, no \"architecture\" for timm)")
    name = str(archs[0])
    cls = _hf_class(name, str(path))
    _weights_file(path)  # a clear error for a folder without weights, before transformers says something longer
    try:
        model = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad folder
        raise InputError(f"{path}: transformers could not load {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    import transformers

    conf = model.config
    meta: dict[str, Any] = {}
    if getattr(conf, "image_size", None):
        meta["input_size"] = list(_pair(conf.image_size))
    if getattr(conf, "num_channels", None):
        meta["channels"] = int(conf.num_channels)
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        try:
            p = json.loads(pre.read_text())
            if p.get("image_mean") and p.get("image_std"):
                meta["mean"], meta["std"] = [float(v) for v in p["image_mean"]], [float(v) for v in p["image_std"]]
        except (OSError, json.JSONDecodeError):
            pass
    labels = [conf.id2label[i] for i in sorted(conf.id2label)] if getattr(conf, "id2label", None) else []
    if labels and not all(str(v) == f"LABEL_{i}" for i, v in enumerate(labels)):
        meta["classes"] = [str(v) for v in labels]
    recipe = {"arch": f"{HF_PREFIX}{name}", "arch_kwargs": {"config": conf.to_dict()}, "transforms": [],
              "transformers": transformers.__version__}
    return LoadedModel(_wrapper_cls()(model.eval()).eval(), "eager", str(path), arch=f"{HF_PREFIX}{name}", recipe=recipe, meta=meta)


# ----------------------------------------------------------------------------- folders


def is_pretrained_folder(path: Path) -> bool:
    """A ``save_pretrained``/timm folder: config.json and no kdtoolkit manifest."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").is_file()


def _weights_file(path: Path) -> Path:
    for n in WEIGHT_FILES:
        if (path / n).is_file():
            return path / n
    if any((path / n).is_file() for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")):
        raise InputError(f"{path}: sharded weights are not supported; save with one weights file (model.safetensors)")
    raise InputError(f"{path}: no weights beside config.json (expected {' or '.join(WEIGHT_FILES)})")


def _read_weights(path: Path) -> dict[str, Any]:
    from kdtoolkit.models.loading import extract_state_dict

    f = _weights_file(path)
    if f.suffix == ".safetensors":
        from kdtoolkit.errors import lazy_import

        st = lazy_import("safetensors.torch", purpose=f"loading {f}")
        try:
            return dict(st.load_file(str(f), device="cpu"))
        except Exception as exc:  # safetensors raises its own types for a bad header
            raise InputError(f"{f}: not a readable safetensors file ({type(exc).__name__})") from None
    import torch

    try:
        obj = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{f}: not a loadable weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return extract_state_dict(obj, str(f))


def load_pretrained_folder(path: str | os.PathLike[str]) -> Any:
    """A timm folder (config.json with ``architecture``) or a transformers ``save_pretrained`` folder (``architectures``)."""
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}/config.json is not readable JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}/config.json is not a JSON object")
    if "architecture" in cfg:
        return _load_timm_folder(path, cfg)
    return _load_hf_folder(path, cfg)


def folder_fingerprint(path: Path) -> str:
    """What identifies a pretrained folder for a run's skip key: the sha256 of its config and weights."""
    from kdtoolkit import fsutil

    parts = [fsutil.sha256_file(path / "config.json"), fsutil.sha256_file(_weights_file(path))]
    if (path / "preprocessor_config.json").is_file():
        parts.append(fsutil.sha256_file(path / "preprocessor_config.json"))
    return fsutil.stable_hash(parts)
