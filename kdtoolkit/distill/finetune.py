"""Fine-tuning helpers: find and replace the classifier head, name the stages to freeze.

Adapting a pretrained teacher to the user's data is the usual first step before distilling (the
shared CIFAR teachers lose 10 points on the JPEG data until fine-tuned). The training itself is
the one :class:`kdtoolkit.distill.trainer.Trainer`, driven by ``freeze``, ``unfreeze_every`` and
``lr_scales`` in its config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdtoolkit.errors import InputError


def find_head(model: nn.Module) -> str:
    """Name of the last nn.Linear in module order: the classifier of the usual CNNs."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        raise InputError("no nn.Linear layer found to use as the classifier head; this model cannot get a new head")
    return name


def replace_head(model: nn.Module, num_classes: int, recipe: dict[str, Any] | None = None, *, force: bool = False) -> tuple[str, bool]:
    """Give the model a new head with ``num_classes`` outputs (kept when the count already fits and not ``force``).

    The recipe's ``num_classes`` is updated so the saved checkpoint rebuilds with the new head.
    Returns (head name, replaced?)."""
    name = find_head(model)
    old = model.get_submodule(name)
    replaced = False
    if old.out_features != num_classes or force:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
        replaced = True
    if recipe is not None:
        recipe.setdefault("arch_kwargs", {})["num_classes"] = num_classes
    return name, replaced


def stage_names(model: nn.Module, head: str) -> list[str]:
    """Top-level parts that hold parameters, in order, without the head: what "the first N stages" counts.

    A model whose body is one Sequential (plus the head) is split into that Sequential's children."""
    top = head.split(".")[0]
    names = [n for n, m in model.named_children() if n != top and any(True for _ in m.parameters())]
    if len(names) == 1 and isinstance(model.get_submodule(names[0]), nn.Sequential):
        seq = names[0]
        names = [f"{seq}.{n}" for n, m in model.get_submodule(seq).named_children() if any(True for _ in m.parameters())]
    return names
