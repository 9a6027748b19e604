"""Transformer students: fewer blocks taken from the teacher, fewer heads and a narrower MLP.

Works on timm's ``VisionTransformer`` layout (``blocks`` of ``attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` /
``mlp.fc2``), which timm teachers and the zoo's ``cifar_vit`` share. Depth: the student keeps S of the
teacher's T blocks with their weights, either evenly spaced (block ``(i+1)*T//S - 1``, the layer the
TinyBERT mapping distils student block i against) or the S blocks that change their input most on a
calibration batch (1 - cosine similarity of a block's input and output, ShortGPT's "block influence").
Width: whole heads (head size kept) and MLP hidden units are pruned through Torch-Pruning's dependency
graph, so every tied projection is cut consistently; the embedding width is kept, which leaves the residual
stream, norms and position embeddings untouched and the hidden-state loss needs no projection.

The recipe records ``{"op": "blocks", "keep": [...]}`` and ``{"op": "heads", "num_heads": [...]}``;
linear shapes come back from the weights (``transforms.fit_to_state_dict``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdtoolkit.errors import InputError, lazy_import


def is_transformer(model: Any) -> bool:
    """Whether ``model`` has the ViT layout this module edits (blocks with a fused qkv attention)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return False
    attn = getattr(blocks[0], "attn", None)
    return isinstance(getattr(attn, "qkv", None), nn.Linear) and hasattr(attn, "num_heads") and hasattr(blocks[0], "mlp")


def is_rebuilt_transformer_graph(model: Any) -> bool:
    """Whether a module tree rebuilt from a TorchScript or ``torch.export`` graph (models.graph) computes attention
    (``quant.ptq.is_transformer_graph`` asks the same of an ONNX graph).

    Such a graph keeps its ops but not timm's ``blocks[i].attn.qkv`` module tree, so no transformer student can be cut
    from it, and the CNN surgery would only fail on it later with a less useful message."""
    graph = getattr(model, "graph", None)
    from kdtoolkit.models.graph import is_rebuilt

    if graph is None or not is_rebuilt(model):
        return False
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    return any("scaled_dot_product_attention" in o for o in ops) or (
        any("softmax" in o for o in ops) and any("layer_norm" in o for o in ops))


def refuse_graph_transformer(model: Any) -> None:
    """One-line error for cutting a student from a graph-form ViT (see ``is_rebuilt_transformer_graph``), naming what works."""
    if is_rebuilt_transformer_graph(model):
        raise InputError("the teacher is a vision transformer saved as a graph (TorchScript or torch.export), which has no "
                         "attention-block modules to cut a student from; name one with --student-arch NAME (e.g. "
                         "cifar_deit), or load the teacher's weights with --arch timm:NAME so its blocks can be shortened")


def shape_of(model: nn.Module) -> dict[str, Any]:
    """Blocks, heads per block, head size and MLP hidden width (from the first block) of a ViT."""
    b0 = model.blocks[0]
    return {"blocks": len(model.blocks), "heads": int(b0.attn.num_heads), "head_dim": int(b0.attn.head_dim),
            "mlp_hidden": int(b0.mlp.fc1.out_features), "embed_dim": int(b0.attn.qkv.in_features)}


def resolve_shape(teacher: nn.Module, cfg: Any) -> dict[str, int]:
    """The student's blocks / heads / MLP width from explicit counts or the depth / width fractions.

    One-line InputErrors (before any training) for counts the teacher cannot give."""
    t = shape_of(teacher)
    blocks = cfg.blocks if cfg.blocks is not None else max(1, round(cfg.depth * t["blocks"]))
    heads = cfg.heads if cfg.heads is not None else max(1, round(cfg.width * t["heads"]))
    mult = cfg.channel_multiple or 1
    if cfg.mlp_hidden is not None:
        mlp = cfg.mlp_hidden
    else:
        mlp = t["mlp_hidden"] if cfg.width >= 1 else max(mult, int(round(cfg.width * t["mlp_hidden"] / mult)) * mult)
    if not 1 <= blocks <= t["blocks"]:
        raise InputError(f"the student asks for {blocks} blocks but the teacher has {t['blocks']}: choose 1..{t['blocks']}")
    if not 1 <= heads <= t["heads"]:
        raise InputError(f"the student asks for {heads} attention heads but the teacher's blocks have {t['heads']}: "
                         f"choose 1..{t['heads']}")
    if not 1 <= mlp <= t["mlp_hidden"]:
        raise InputError(f"the student asks for an MLP of {mlp} hidden units but the teacher's has {t['mlp_hidden']}")
    if cfg.mlp_hidden is not None and mult > 1 and mlp % mult:
        raise InputError(f"--mlp-hidden {mlp} is not a multiple of the profile's channel multiple {mult}")
    return {"blocks": blocks, "heads": heads, "mlp_hidden": mlp}


def select_blocks(model: nn.Module, n: int, how: str = "uniform", calib: Any = None) -> tuple[list[int], dict[str, Any]]:
    """Indices of the ``n`` teacher blocks the student keeps (in order) and what decided them."""
    total = len(model.blocks)
    uniform = [(i + 1) * total // n - 1 for i in range(n)]
    if how == "uniform" or n == total:
        return uniform, {"block_select": "uniform"}
    if calib is None:
        return uniform, {"block_select": "uniform", "why": "no calibration batch for the cosine measure"}
    x = next(iter(calib))[0] if not isinstance(calib, torch.Tensor) else calib
    influence = block_influence(model, x[:64])
    keep = sorted(sorted(range(total), key=lambda i: -influence[i])[:n])
    return keep, {"block_select": "cosine", "block_influence": [round(v, 5) for v in influence]}


@torch.no_grad()
def block_influence(model: nn.Module, x: torch.Tensor) -> list[float]:
    """1 - mean cosine similarity of each block's input and output tokens: a block that barely changes the
    residual stream (near 0) is the cheapest to drop (Men et al. 2024, "ShortGPT")."""
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    hooks = []
    def keep(i: int):
        def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:  # None: the output is unchanged
            ins[i], outs[i] = inp[0], out

        return hook

    for i, b in enumerate(model.blocks):
        hooks.append(b.register_forward_hook(keep(i)))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return [float(1 - torch.nn.functional.cosine_similarity(ins[i], outs[i], dim=-1).mean()) for i in range(len(model.blocks))]


def keep_blocks(model: nn.Module, keep: list[int]) -> None:
    """Keep only the blocks ``keep`` (teacher indices, in order) with their weights."""
    blocks = model.blocks
    new = [blocks[i] for i in keep]
    model.blocks = nn.Sequential(*new) if isinstance(blocks, nn.Sequential) else nn.ModuleList(new)
    if hasattr(model, "depth"):
        model.depth = len(keep)


def set_heads(model: nn.Module, num_heads: list[int]) -> None:
    """Tell each attention how many heads it has now (head size kept; shapes of the linears follow the weights)."""
    for b, h in zip(model.blocks, num_heads):
        b.attn.num_heads = int(h)
        b.attn.attn_dim = int(h) * int(b.attn.head_dim)


def prune_width(model: nn.Module, example: torch.Tensor, heads: int, mlp_hidden: int) -> dict[str, Any]:
    """Remove whole heads and MLP hidden units in place with Torch-Pruning (group L2 importance); embedding kept."""
    s = shape_of(model)
    if heads == s["heads"] and mlp_hidden == s["mlp_hidden"]:
        return {}
    tp = lazy_import("torch_pruning", extra="pruning", purpose="transformer head / MLP pruning")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    qkvs = {b.attn.qkv: int(b.attn.num_heads) for b in model.blocks}
    # every layer that writes the embedding (patch projection, attention and MLP outputs, classifier) is ignored
    # as a root, so the only groups left are each block's heads (qkv -> proj) and MLP hidden units (fc1 -> fc2)
    writers = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:] + [b.attn.proj for b in model.blocks] \
        + [b.mlp.fc2 for b in model.blocks] + [m for m in getattr(model, "patch_embed", nn.Identity()).modules()
                                              if isinstance(m, (nn.Conv2d, nn.Linear))]
    # ratios half a unit off the target: Torch-Pruning rounds heads removed up (ceil) and units kept down (int),
    # and 1 - 2/3 in floating point can land on either side of the whole number
    head_ratio = (s["heads"] - heads - 0.5) / s["heads"] if heads < s["heads"] else 0.0
    mlp_ratio = 1 - (mlp_hidden + 0.5) / s["mlp_hidden"] if mlp_hidden < s["mlp_hidden"] else 0.0
    import warnings

    with warnings.catch_warnings():  # cls_token / pos_embed: "unwrapped parameters"; the embedding is never cut here
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=head_ratio,
            pruning_ratio_dict={b.mlp.fc1: mlp_ratio for b in model.blocks},
            num_heads=qkvs, prune_num_heads=heads < s["heads"], prune_head_dims=False,
        head_pruning_ratio=head_ratio, ignored_layers=writers,
        )
        pruner.step()
    for b in model.blocks:
        n = pruner.num_heads.get(b.attn.qkv, heads)
        set_heads_one(b.attn, int(n))
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    got = shape_of(model)
    if got["heads"] != heads or got["mlp_hidden"] != mlp_hidden or got["embed_dim"] != s["embed_dim"]:
        raise InputError(f"pruning to {heads} heads / MLP {mlp_hidden} gave {got['heads']} heads / MLP {got['mlp_hidden']} / "
                         f"embedding {got['embed_dim']}: this transformer's layout is not one Torch-Pruning cuts cleanly")
    return {"heads": heads, "mlp_hidden": mlp_hidden}


def set_heads_one(attn: nn.Module, heads: int) -> None:
    attn.num_heads = heads
    attn.head_dim = attn.qkv.out_features // (3 * heads)
    attn.attn_dim = heads * attn.head_dim


def make_transformer_student(model: nn.Module, cfg: Any, *, input_shape: tuple[int, ...],
                             calib_batches: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shrink ``model`` (a copy of the teacher) in place; return (info, recipe transforms)."""
    shape = resolve_shape(model, cfg)
    t = shape_of(model)
    if (shape["blocks"], shape["heads"], shape["mlp_hidden"]) == (t["blocks"], t["heads"], t["mlp_hidden"]):
        raise InputError("the student would be a copy of the teacher: give fewer --blocks / --heads / --mlp-hidden, "
                         "--depth / --width below 1, or --speedup X / --latency-budget MS to search")
    keep, why = select_blocks(model, shape["blocks"], cfg.block_select, calib_batches)
    keep_blocks(model, keep)
    example = torch.zeros(1, *input_shape[1:])
    prune_width(model, example, shape["heads"], shape["mlp_hidden"])
    with torch.no_grad():
        model.eval()(example)
    info = {"transformer": {"teacher": t, "student": shape_of(model), "kept_blocks": keep, **why}}
    transforms = [{"op": "blocks", "keep": keep}, {"op": "heads", "num_heads": [int(b.attn.num_heads) for b in model.blocks]}]
    return info, transforms


def apply_transform(model: nn.Module, t: dict[str, Any]) -> None:
    """Replay a recipe op on a freshly built architecture (structure only; weights come after)."""
    if t["op"] == "blocks":
        keep_blocks(model, list(t["keep"]))
    elif t["op"] == "heads":
        set_heads(model, list(t["num_heads"]))


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """TinyBERT's uniform mapping: student block i learns from teacher block (i+1)*T/S - 1."""
    return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]
