"""Parameter-efficient fine-tuning through peft: attach, save alone, re-apply, merge for export.

Why peft and not our own LoRA: its adapter files (``adapter_model.safetensors`` +
``adapter_config.json``) are the format people already load elsewhere, and its merge code is
maintained against every layer type it supports. Our part is what peft leaves to the caller:
choosing the layers (every Linear and ungrouped Conv2d except the head, or user patterns),
refusing a rank a layer cannot hold before anything trains, keeping the head and the
normalisation layers trainable (peft ``modules_to_save``, so they are saved with the adapter),
and tying the adapter to its base model by sha256 so it is never applied to another one.

The adapter folder holds peft's two files plus ``kdtoolkit_adapter.json`` (:data:`REF_NAME`): the
base model's path, sha256 and recipe, the head and class count, and the resolved settings. peft
is imported lazily (``pip install 'kdtoolkit[adapters]'``).
"""

from __future__ import annotations

import copy
import fnmatch
import os
from pathlib import Path
from typing import Any

from torch import nn

from kdtoolkit.config import AdapterConfig
from kdtoolkit.errors import InputError

REF_NAME = "kdtoolkit_adapter.json"
REF_FORMAT = "kdtoolkit.adapter/1"
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
ADAPTED_TYPES = (nn.Linear, nn.Conv2d)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _peft() -> Any:
    from kdtoolkit.errors import lazy_import

    return lazy_import("peft", extra="adapters", purpose="adapter fine-tuning (--adapter)")


# ---- choosing layers and checking the rank (before anything trains) ----

def max_rank(module: nn.Module) -> int:
    """The largest useful rank of a layer's update: the rank bound of its weight seen as a matrix.

    Linear: min(in, out). Conv2d: min(out_channels, in_channels / groups x kernel area), the shape of
    the update LoRA's two convs (k x k then 1 x 1) can express; a 3->16 3x3 stem allows 16."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return min(module.out_channels, module.in_channels // module.groups * kh * kw)
    return min(module.in_features, module.out_features)


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return f"Conv2d {module.in_channels}->{module.out_channels}, {kh}x{kw}"
    return f"Linear {module.in_features}->{module.out_features}"


def resolve_targets(model: nn.Module, cfg: AdapterConfig, head: str | None) -> list[str]:
    """Full names of the layers to adapt: cfg.target_modules patterns, else every Linear and ungrouped Conv2d but the head.

    Grouped (depthwise) convs are left out by default and refused by name: peft cannot merge an adapter into them."""
    layers = {n: m for n, m in model.named_modules() if n and isinstance(m, ADAPTED_TYPES)}
    if cfg.target_modules:
        picked = [n for n in layers if any(fnmatch.fnmatchcase(n, p) for p in cfg.target_modules)]
        if not picked:
            raise InputError(f"--target-modules {','.join(cfg.target_modules)} matches no Linear/Conv2d layer; "
                             f"layers: {_short(list(layers))}")
        grouped = [n for n in picked if isinstance(layers[n], nn.Conv2d) and layers[n].groups > 1]
        if grouped:
            raise InputError(f"--target-modules picks grouped convs ({_short(grouped)}): peft cannot merge an adapter "
                             "into them for export; leave them out")
        if head in picked and cfg.train_head:
            picked.remove(head)  # the head trains in full (modules_to_save); an adapter on it too would be redundant
    else:
        picked = [n for n, m in layers.items() if n != head and not (isinstance(m, nn.Conv2d) and m.groups > 1)]
    if not picked:
        raise InputError("no Linear/Conv2d layer to adapt besides the head; fine-tune without --adapter")
    return picked


def check_rank(model: nn.Module, targets: list[str], rank: int) -> None:
    """Refuse a rank larger than a targeted layer can use, naming the first such layer."""
    for n in targets:
        m = model.get_submodule(n)
        if rank > max_rank(m):
            raise InputError(f"--rank {rank} is larger than layer {n} ({_describe(m)}) allows: at most {max_rank(m)}; "
                             "lower --rank or leave the layer out with --target-modules")


def norm_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and isinstance(m, NORM_TYPES)]


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def peft_config(cfg: AdapterConfig, targets: list[str], save: list[str]) -> Any:
    """The peft config object for the method."""
    peft = _peft()
    alpha = cfg.alpha if cfg.alpha is not None else float(cfg.rank)
    if cfg.method == "lora":
        return peft.LoraConfig(r=cfg.rank, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=targets,
                               modules_to_save=save or None, bias="none")
    return peft.LoHaConfig(r=cfg.rank, alpha=alpha, rank_dropout=cfg.dropout, target_modules=targets, modules_to_save=save or None)


def _wrapped(model: nn.Module) -> set[str]:
    """Names (in the base model) of the modules peft keeps a trainable copy of."""
    prefix = "base_model.model."
    return {n.removeprefix(prefix) for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"}


def plan(model: nn.Module, cfg: AdapterConfig, head: str | None) -> dict[str, Any]:
    """Everything decided before training: targets (rank checked), modules trained alongside. Raises InputError."""
    targets = resolve_targets(model, cfg, head)
    check_rank(model, targets, cfg.rank)
    save = (norm_modules(model) if cfg.train_norms else []) + ([head] if cfg.train_head and head else [])
    return {"targets": targets, "modules_to_save": save}


def attach(model: nn.Module, cfg: AdapterConfig, head: str | None, *, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """Wrap ``model`` in a peft model with fresh adapters; only adapters, head and norms are trainable.

    The seed fixes the adapters' initialisation, so a resumed run rebuilds the same module tree."""
    import torch

    p = plan(model, cfg, head)
    peft = _peft()
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft_config(cfg, p["targets"], p["modules_to_save"]))
    _check_wrapped(pm, p["modules_to_save"])
    return pm, p


def _check_wrapped(pm: nn.Module, save: list[str]) -> None:
    """peft matches modules_to_save by name suffix; refuse a model where that caught more than we asked for."""
    extra = sorted(_wrapped(pm) - set(save))
    if extra:
        raise InputError(f"peft would also train {_short(extra)} (module names ending like a head/norm name); "
                         "pass --no-adapter-norms or rename the modules")


def trainable(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (the total counts the frozen base once and the trained copies too)."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": n_train, "total_params": sum(p.numel() for p in model.parameters())}


def merge(peft_model: nn.Module) -> nn.Module:
    """The adapted model as a plain module (adapters merged into the weights, trained head/norms in place).

    Works on a copy: the peft model stays usable (its logits are the reference the merge is checked against)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return merged.eval()


# ---- the adapter folder ----

def model_file(path: str | os.PathLike[str]) -> Path:
    """The file whose sha256 identifies a base model: the file itself, or an artifact folder's model file."""
    p = Path(path)
    if p.is_dir():
        from kdtoolkit.artifact import Artifact

        art = Artifact.load(p)
        name = art.info.get("model_file")
        return art.file(name) if name else art.first_file(".pt")
    if not p.exists():
        raise InputError(f"model file not found: {p}")
    return p


def base_reference(base_path: str | os.PathLike[str], *, arch: str | None, recipe: dict[str, Any] | None,
                   head: str | None, num_classes: int, head_replaced: bool) -> dict[str, Any]:
    """What it takes to rebuild the base the adapter was trained on, and to recognise it (sha256)."""
    from kdtoolkit import fsutil

    f = model_file(base_path)
    return {"path": str(Path(base_path).resolve()), "file": str(f.resolve()), "sha256": fsutil.sha256_file(f), "arch": arch,
            "recipe": recipe, "head": head, "num_classes": num_classes, "head_replaced": head_replaced}


def save_adapter(peft_model: nn.Module, out_dir: str | os.PathLike[str], *, base: dict[str, Any], cfg: AdapterConfig,
                 adapter_plan: dict[str, Any], meta: dict[str, Any] | None = None) -> Path:
    """Write peft's adapter files (adapter weights + head/norm copies only) and the base reference beside them."""
    from kdtoolkit import fsutil

    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(d))
    (d / "README.md").unlink(missing_ok=True)  # peft's model-card stub: nothing in it for a local adapter
    fsutil.write_json(d / REF_NAME, {"format": REF_FORMAT, "method": cfg.method, "config": cfg.model_dump(mode="json"),
                                     "targets": adapter_plan["targets"], "modules_to_save": adapter_plan["modules_to_save"],
                                     "base": base, "model": meta or {}, **trainable(peft_model)})
    return d


def read_adapter(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The base reference of an adapter folder (a finetune artifact's ``adapter/`` or the folder itself)."""
    import json

    d = Path(adapter_dir)
    if (d / "adapter" / REF_NAME).exists():
        d = d / "adapter"
    missing = [n for n in (*PEFT_FILES, REF_NAME) if not (d / n).is_file()]
    if missing:
        raise InputError(f"{adapter_dir} is not a kdtoolkit adapter folder (missing {', '.join(missing)}); "
                         "give the --out of `kdtoolkit finetune --adapter ...` or its adapter/ folder")
    ref = json.loads((d / REF_NAME).read_text())
    if ref.get("format") != REF_FORMAT:
        raise InputError(f"{d / REF_NAME}: unknown format {ref.get('format')!r} (expected {REF_FORMAT})")
    ref["dir"] = str(d)
    return ref


def check_base(ref: dict[str, Any], base_path: str | os.PathLike[str]) -> None:
    """Refuse to apply an adapter to a base model other than the one it was trained on (sha256 differs)."""
    from kdtoolkit import fsutil

    got = fsutil.sha256_file(model_file(base_path))
    want = ref["base"]["sha256"]
    if got != want:
        raise InputError(f"adapter {ref['dir']} was trained on {ref['base']['path']} (sha256 {want[:12]}...), but {base_path} "
                         f"has sha256 {got[:12]}...: an adapter only fits the exact base model it was trained on")


def apply_adapter(model: nn.Module, ref: dict[str, Any], *, trainable_: bool = False) -> nn.Module:
    """Load a saved adapter onto its (already loaded, sha-checked) base: the head is rebuilt to the adapter's class count."""
    from kdtoolkit.distill.finetune import replace_head

    base = ref["base"]
    if base.get("head"):
        replace_head(model, int(base["num_classes"]), force=bool(base.get("head_replaced")))
    pm = _peft().PeftModel.from_pretrained(model, ref["dir"], is_trainable=trainable_)
    _check_wrapped(pm, ref.get("modules_to_save", []))
    return pm


def merge_saved(base_path: str | os.PathLike[str], adapter_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                arch: str | None = None, trust_pickle: bool = False):
    """Apply a saved adapter to its base model and write the merged model as a torch artifact (what compress takes).

    The base is checked by sha256 before it is loaded; the merge is checked against the adapted model on a seeded
    random batch of the model's input shape (max |logit diff| in the metrics). Returns the Artifact."""
    import torch

    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.models.loading import load_model, save_checkpoint

    ref = read_adapter(adapter_dir)
    check_base(ref, base_path)
    base = ref["base"]
    loaded = load_model(base_path, arch=arch or base.get("arch"), trust_pickle=trust_pickle)
    if not loaded.rewritable:
        raise InputError(f"{base_path}: a {loaded.form} model cannot take an adapter; give the state dict with --arch or a kdtoolkit checkpoint")
    adapted = apply_adapter(loaded.module, ref).eval()
    merged = merge(adapted)
    meta = ref.get("model") or {}
    shape = (int(meta.get("channels") or 0), *[int(v) for v in meta.get("input_size") or ()])
    diff = None
    if len(shape) == 3 and all(shape):
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((adapted(x) - merged(x)).abs().max())
    recipe = dict(base.get("recipe") or {"arch": base.get("arch"), "arch_kwargs": {}, "transforms": []})
    recipe["arch_kwargs"] = {**recipe.get("arch_kwargs", {}), "num_classes": int(base["num_classes"])} if base.get("head") else \
        recipe.get("arch_kwargs", {})
    with ArtifactWriter(out_dir, kind="torch", stage="adapter-merge", config={"adapter": ref["config"]}) as w:
        save_checkpoint(w.path("model.pt"), merged, recipe, meta)
        w.metrics.update({"merge_max_abs_diff": diff, **{k: ref.get(k) for k in ("trainable_params",)}})
        w.info.update({"model": meta, "model_file": "model.pt", "recipe": recipe, "arch": recipe.get("arch"),
                       "adapter": {"dir": str(Path(ref["dir"]).resolve()), "base": base["path"], "base_sha256": base["sha256"]}})
    return w.artifact
