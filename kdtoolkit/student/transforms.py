"""Structural transforms that turn a teacher into a student, replayable from a recipe.

* ``separable``: every standard KxK conv (groups 1, K>1) becomes depthwise KxK + pointwise 1x1,
  initialised from the teacher by the best rank-1 factorisation per input channel (DESIGN.md):
  W[:, i] (out x K*K) ~ s u v^T, so the depthwise filter is sqrt(s) v and the pointwise column
  sqrt(s) u; with both, the pair reproduces the teacher's conv up to the rank-1 error.
* ``depth``: drop trailing shape-preserving blocks inside a stage (nn.Sequential of blocks).

A recipe is ``{"arch", "arch_kwargs", "transforms": [...]}``; replaying the transforms with
``init="none"`` and then :func:`fit_to_state_dict` rebuilds the exact student from its weights.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from kdtoolkit.errors import InputError


class SeparableConv2d(nn.Sequential):
    """Depthwise KxK (stride, padding, dilation of the original) followed by pointwise 1x1."""

    def __init__(self, conv: nn.Conv2d) -> None:
        cin, cout = conv.in_channels, conv.out_channels
        super().__init__()
        self.depthwise = nn.Conv2d(
            cin, cin, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            groups=cin, bias=False, padding_mode=conv.padding_mode,
        )
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=conv.bias is not None)


def rank1_init(sep: SeparableConv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
    """Set ``sep`` to the best rank-1 factorisation of ``weight``; return the kept energy fraction."""
    out_c, in_c, kh, kw = weight.shape
    w = weight.detach().float()
    mats = w.permute(1, 0, 2, 3).reshape(in_c, out_c, kh * kw)  # per input channel: out x K*K
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    root = s[:, 0].clamp_min(0).sqrt()
    d = (vh[:, 0, :] * root[:, None]).reshape(in_c, 1, kh, kw)
    p = (u[:, :, 0] * root[:, None]).T.reshape(out_c, in_c, 1, 1)
    with torch.no_grad():
        sep.depthwise.weight.copy_(d)
        sep.pointwise.weight.copy_(p)
        if bias is not None and sep.pointwise.bias is not None:
            sep.pointwise.bias.copy_(bias.detach())
    total = (s**2).sum().item()
    return float((s[:, 0] ** 2).sum().item() / total) if total > 0 else 1.0


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convertible_convs(
    model: nn.Module, *, skip_stem: bool = True, skip_first: int = 0, skip: list[str] | None = None, only: list[str] | None = None
) -> list[str]:
    """Names of the standard KxK convs the separable transform would replace, in module order."""
    names = [
        n for n, m in model.named_modules()
        if type(m) is nn.Conv2d and m.groups == 1 and max(m.kernel_size) > 1
    ]
    all_convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    drop = set()
    if skip_stem and all_convs and all_convs[0] in names:
        drop.add(all_convs[0])
    drop.update(names[:skip_first])
    for pat in skip or []:
        drop.update(n for n in names if fnmatch.fnmatch(n, pat) or n.startswith(pat + "."))
    keep = [n for n in names if n not in drop]
    if only:
        keep = [n for n in keep if any(n == o or n.startswith(o + ".") or fnmatch.fnmatch(n, o) for o in only)]
    return keep


def to_separable(model: nn.Module, *, init: str = "svd", **select: Any) -> dict[str, Any]:
    """Replace the selected convs in place; return what was converted and the rank-1 energy kept."""
    names = convertible_convs(model, **select)
    if not names:
        raise InputError(
            "nothing to convert: the model has no standard KxK convolutions (groups=1, K>1) left after the skip options"
        )
    energy = {}
    for name in names:
        conv = model.get_submodule(name)
        sep = SeparableConv2d(conv)
        if init == "svd":
            energy[name] = rank1_init(sep, conv.weight, conv.bias)
        _set_child(model, name, sep)
    return {"converted": names, "rank1_energy": energy}


def _block_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[Any, Any]]:
    shapes: dict[str, tuple[Any, Any]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential):
            for i, child in enumerate(mod):
                key = f"{name}.{i}" if name else str(i)

                def hook(_m, inp, out, key=key):
                    if isinstance(inp[0], torch.Tensor) and isinstance(out, torch.Tensor):
                        shapes[key] = (tuple(inp[0].shape), tuple(out.shape))

                hooks.append(child.register_forward_hook(hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(example)
    model.train(was)
    for h in hooks:
        h.remove()
    return shapes


def droppable_blocks(model: nn.Module, example: torch.Tensor) -> dict[str, list[int]]:
    """Per stage (an nn.Sequential of same-class blocks), the indices of blocks whose output shape equals their input's."""
    shapes = _block_shapes(model, example)
    out: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential) or len(mod) < 2:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1 or next(iter(kinds)) in (nn.Conv2d, nn.BatchNorm2d, nn.ReLU):
            continue
        idx = [i for i in range(len(mod)) if (s := shapes.get(f"{name}.{i}" if name else str(i))) and s[0] == s[1]]
        if idx:
            out[name] = idx
    # a stage inside a block of another stage is that block's own layers (RegNet's ``f``), not a stage of blocks
    return {n: i for n, i in out.items() if not any(n.startswith(o + ".") for o in out if o != n)}


def reduce_depth(model: nn.Module, keep: dict[str, int]) -> dict[str, Any]:
    """Keep the first ``keep[stage]`` blocks of each named stage (the rest must be shape-preserving; 0 empties it)."""
    dropped = {}
    for stage, k in keep.items():
        seq = model.get_submodule(stage)
        if not isinstance(seq, nn.Sequential):
            raise InputError(f"depth reduction: {stage!r} is not a stage (nn.Sequential) of this model")
        if k < 0 or k > len(seq):
            raise InputError(f"depth reduction: stage {stage!r} has {len(seq)} blocks, cannot keep {k}")
        dropped[stage] = len(seq) - k
        # keep the children's own names (torchvision's RegNet names them "block2-0"), so stages nested in them still resolve
        _set_child(model, stage, nn.Sequential(OrderedDict(list(seq.named_children())[:k])))
    return {"dropped_blocks": dropped}


def depth_stages(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Stages whose tail can be shortened, in forward order: name -> (blocks, fewest that can stay).

    The fewest is the index of the first shape-preserving block: 0 when every block keeps its input's shape (the
    stage can go entirely), 1 when the first block downsamples."""
    out = {}
    for stage, idx in droppable_blocks(model, example).items():
        n = len(model.get_submodule(stage))
        first_droppable = min(idx)
        if sorted(idx) == list(range(first_droppable, n)):  # else a non shape-preserving block follows a droppable one
            out[stage] = (n, first_droppable)
    return out


def plan_depth(model: nn.Module, example: torch.Tensor, fraction: float, keep: dict[str, int] | None = None) -> dict[str, int]:
    """How many blocks to keep per stage: ``keep`` for the stages it names, else the depth fraction (at least one);
    only shape-preserving blocks are dropped."""
    stages = depth_stages(model, example)
    unknown = sorted(set(keep or {}) - set(stages))
    if unknown:
        from kdtoolkit.models.graph import is_rebuilt

        graph = "" if stages or not is_rebuilt(model) else (
            "; a model loaded from TorchScript or torch.export keeps its ops but not its nn.Sequential stages: hand over its "
            "state dict with --arch to shorten them")
        raise InputError(f"--keep-blocks names {', '.join(unknown)}, which is not a stage of repeated blocks of this model "
                         f"(stages: {', '.join(stages) or 'none'}){graph}")
    plan = {}
    for stage, (n, fewest) in stages.items():
        if keep and stage in keep:
            k = keep[stage]
            if not fewest <= k <= n:
                raise InputError(f"--keep-blocks {stage}={k}: the stage has {n} blocks and must keep "
                                 + (f"between {fewest} and {n}" + (" (its first block changes the shape)" if fewest else "")))
        else:
            k = max(fewest, round(n * fraction), 1)
        if k < n:
            plan[stage] = k
    return plan


def apply_transforms(model: nn.Module, transforms: list[dict[str, Any]], *, init: str = "none") -> nn.Module:
    """Replay a recipe's transforms (structure only unless ``init='svd'``)."""
    for t in transforms:
        op = t.get("op")
        if op == "separable":
            to_separable(model, init=init, **{k: v for k, v in t.items() if k in ("skip_stem", "skip_first", "skip", "only")})
        elif op == "depth":
            reduce_depth(model, t["keep"])
        elif op == "width":
            pass  # widths are fitted from the saved weights by fit_to_state_dict
        elif op in ("blocks", "heads"):  # transformer students (kdtoolkit.student.transformer)
            from kdtoolkit.student.transformer import apply_transform

            apply_transform(model, t)
        else:
            raise InputError(f"unknown transform {op!r} in recipe")
    return model


def fit_to_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Resize convs, BatchNorms and linears to the shapes in ``state`` (width-shrunk students)."""
    for name, mod in list(model.named_modules()):
        idx = state.get(f"{name}.channel_index")
        if idx is not None and hasattr(mod, "set_map"):  # a shrunk option-A shortcut
            m = [int(v) for v in idx.tolist()]
            mod.set_map(m, max(m) + 1 if max(m) >= 0 else 0)
        w = state.get(f"{name}.weight")
        if w is None:
            continue
        if isinstance(mod, nn.Conv2d) and tuple(w.shape) != tuple(mod.weight.shape):
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            cout, cin_g = w.shape[0], w.shape[1]
            groups = cout if depthwise else mod.groups
            new = nn.Conv2d(cin_g * groups, cout, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                            groups=groups, bias=mod.bias is not None, padding_mode=mod.padding_mode)
            _set_child(model, name, new)
        elif isinstance(mod, nn.BatchNorm2d) and w.shape[0] != mod.num_features:
            _set_child(model, name, nn.BatchNorm2d(w.shape[0], eps=mod.eps, momentum=mod.momentum))
        elif isinstance(mod, nn.Linear) and tuple(w.shape) != tuple(mod.weight.shape):
            _set_child(model, name, nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Any, max_batches: int = 20) -> int:
    """Re-estimate BatchNorm running statistics after surgery (cumulative average over a few batches)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    n = 0
    for x, *_ in batches:
        model(x)
        n += 1
        if n >= max_batches:
            break
    for m, (mom, _tr) in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return n
