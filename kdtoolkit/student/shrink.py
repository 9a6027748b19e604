"""Width shrinking across residual connections with Torch-Pruning's dependency graph.

Channels tied by residual additions are pruned together (Torch-Pruning groups them); the most
important channels are kept (group L2 magnitude, or BatchNorm scale) and counts are rounded to
the multiple the profile asks for (8 for TensorRT INT8 tensor cores). Parameter-free option-A
shortcuts get a custom pruner: their input and output channels are independent, joined by a
channel map.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdtoolkit.errors import InputError, lazy_import
from kdtoolkit.models.zoo import ShortcutA


def _shortcut_pruner(tp: Any) -> Any:
    class ShortcutAPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: ShortcutA, idxs: list[int]) -> ShortcutA:
            drop = set(int(i) for i in idxs)
            layer.set_map([c for j, c in enumerate(layer.channel_map()) if j not in drop], layer.in_planes)
            return layer

        def prune_in_channels(self, layer: ShortcutA, idxs: list[int]) -> ShortcutA:
            drop = set(int(i) for i in idxs)
            keep = [i for i in range(layer.in_planes) if i not in drop]
            remap = {old: new for new, old in enumerate(keep)}
            layer.set_map([remap.get(c, -1) if c >= 0 else -1 for c in layer.channel_map()], len(keep))
            return layer

        def get_out_channels(self, layer: ShortcutA) -> int:
            return len(layer.channel_map())

        def get_in_channels(self, layer: ShortcutA) -> int:
            return layer.in_planes

    return ShortcutAPruner()


def shrink_width(model: nn.Module, example: torch.Tensor, width: float, *, round_to: int = 1,
                 importance: str = "l2", keep: list[nn.Module] | None = None) -> dict[str, Any]:
    """Prune ``1 - width`` of the channels of every prunable group in place; the classifier is kept."""
    if not 0 < width <= 1:
        raise InputError(f"width must be in (0, 1], got {width}")
    if width == 1:
        return {"width": 1.0}
    tp = lazy_import("torch_pruning", extra="pruning", purpose="width shrinking")
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    imp = tp.importance.BNScaleImportance() if importance == "bn" else tp.importance.GroupMagnitudeImportance(p=2)
    before = sum(p.numel() for p in model.parameters())
    # Torch-Pruning traces the graph through autograd: parameters frozen by an earlier run (a teacher
    # after training) would hide every layer and the "shrink" would silently change nothing
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, pruning_ratio=1 - width, ignored_layers=heads + list(keep or []),
        round_to=round_to if round_to > 1 else None, customized_pruners={ShortcutA: _shortcut_pruner(tp)},
    )
    pruner.step()
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    after = sum(p.numel() for p in model.parameters())
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:  # a channel dependency Torch-Pruning did not see (e.g. zero-padding in a traced shortcut)
        raise InputError(f"width {width:g} broke the model's channel structure ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:120]}); keep --width 1 for this model") from None
    if after >= before:
        raise InputError(f"width {width:g} shrank nothing ({before:,} parameters before and after): no prunable channel group was found")
    return {"width": width, "params_before": before, "params_after": after, "importance": importance, "round_to": round_to}
