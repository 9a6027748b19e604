"""The student stage: derive a student from the teacher (or build a named architecture).

Surgery works on eager ``nn.Module`` teachers. TorchScript and ``torch.export`` teachers cannot
be rewritten module by module; their student comes from ``student_arch``.
"""

from __future__ import annotations

import copy
from typing import Any

from kdtoolkit.config import StudentConfig  # re-exported: configs live in kdtoolkit.config
from kdtoolkit.errors import InputError


def count_params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: Any, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of convs and linears at batch 1 (forward hooks; no extra dependency)."""
    import torch
    from torch import nn

    total = 0
    hooks = []

    def conv_hook(m: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += int(out.numel() // out.shape[0]) * k

    def lin_hook(m: nn.Linear, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lin_hook))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape[1:]))
    model.train(was)
    for h in hooks:
        h.remove()
    return total


def make_student(teacher: Any, cfg: StudentConfig, *, input_shape: tuple[int, ...], num_classes: int,
                 calib_batches: Any = None) -> tuple[Any, dict[str, Any] | None, dict[str, Any]]:
    """Return (student module, recipe, info). ``teacher`` is a LoadedModel.

    The recipe is None when the teacher has none (full pickle, TorchScript, ``torch.export``): such a
    student is stored as a ``torch.export`` program (``models.loading.save_model``)."""
    import torch

    from kdtoolkit.models.loading import build_arch
    from kdtoolkit.student import transforms as T

    info: dict[str, Any] = {}
    if cfg.arch:
        from kdtoolkit.models.loading import _arch_kwargs
        from kdtoolkit.models.zoo import ARCHS

        kwargs: dict[str, Any] = _arch_kwargs(cfg.arch, num_classes, input_shape[1], tuple(input_shape[2:4]))  # type: ignore[arg-type]
        if cfg.arch in ARCHS:
            if cfg.arch_width:
                kwargs["width"] = cfg.arch_width
        model = build_arch(cfg.arch, **kwargs)
        recipe: dict[str, Any] | None = {"arch": cfg.arch, "arch_kwargs": kwargs, "transforms": []}
        base_init = "random"
    else:
        if not teacher.rewritable:
            from kdtoolkit.models.loading import as_graph_modules

            teacher = as_graph_modules(teacher, input_shape)  # TorchScript: convert the graph itself
            info["graph_converted_from"] = "torchscript"
        if not teacher.rewritable:
            raise InputError(
                f"the teacher is a {teacher.form} model whose graph cannot be rebuilt as modules; "
                "name a student architecture with --student-arch NAME (e.g. cifar_resnet20, torchvision:mobilenet_v2)"
            )
        from kdtoolkit.student.transformer import refuse_graph_transformer

        refuse_graph_transformer(teacher.module)
        model = copy.deepcopy(teacher.module).cpu()
        for p in model.parameters():  # a teacher frozen by an earlier run in this process must not freeze its student
            p.requires_grad_(True)
        # no recipe (full pickle, TorchScript, torch.export): the student is stored as a torch.export program
        recipe = copy.deepcopy(teacher.recipe) if teacher.recipe is not None else None
        base_init = "teacher"
    model.eval()
    example = torch.zeros(1, *input_shape[1:])
    from kdtoolkit.student.transformer import is_transformer

    vit_only = [f for f, v in (("--blocks", cfg.blocks), ("--heads", cfg.heads), ("--mlp-hidden", cfg.mlp_hidden)) if v is not None]
    if vit_only and (cfg.arch or not is_transformer(model)):
        raise InputError(f"{', '.join(vit_only)} shape(s) a student cut from a vision transformer teacher; "
                         + (f"--student-arch {cfg.arch} builds its own" if cfg.arch else "this teacher is not one (use --depth/--width)"))
    if not cfg.arch and is_transformer(model):  # a ViT teacher: blocks, heads and MLP width, not conv surgery
        if cfg.keep_blocks:
            raise InputError("--keep-blocks shortens a CNN's stages; a transformer student keeps --blocks N")
        from kdtoolkit.student.transformer import make_transformer_student

        info["init"] = "teacher"
        t_info, transforms = make_transformer_student(model, cfg, input_shape=input_shape, calib_batches=calib_batches)
        info.update(t_info)
        for t in transforms:
            _record(recipe, t)
        return model, recipe, info
    if cfg.depth < 1.0 or cfg.keep_blocks:
        plan = T.plan_depth(model, example, cfg.depth, keep=cfg.keep_blocks)
        if not plan:
            raise InputError("--keep-blocks keeps every block: nothing to shorten" if cfg.keep_blocks else
                             "depth reduction found no stage of repeated shape-preserving blocks to shorten")
        info.update(T.reduce_depth(model, plan))
        _record(recipe, {"op": "depth", "keep": plan})
    if cfg.width < 1.0:
        from kdtoolkit.student.shrink import shrink_width

        info["shrink"] = shrink_width(model, example, cfg.width, round_to=cfg.channel_multiple or 1, importance=cfg.width_importance)
        _record(recipe, {"op": "width", "width": cfg.width})
    if cfg.separable and not (cfg.arch and is_transformer(model)):  # a ViT student (cifar_deit): no convs to convert
        sel = {"skip_stem": cfg.skip_stem, "skip_first": cfg.skip_first, "skip": cfg.skip, "only": cfg.only}
        if T.convertible_convs(model, **sel) or cfg.arch:
            conv_info = T.to_separable(model, init="svd" if cfg.init == "svd" and base_init == "teacher" else "none", **sel)
            info["converted"] = conv_info["converted"]
            if conv_info["rank1_energy"]:
                e = list(conv_info["rank1_energy"].values())
                info["rank1_energy_mean"] = float(sum(e) / len(e))
            _record(recipe, {"op": "separable", **sel})
        else:
            info["converted"] = []  # already separable (MobileNet, EfficientNet, RegNet): depth and width make the student
    if cfg.arch and is_transformer(model):
        info["init"] = "random (the architecture's own init)"  # kaiming suits convs, not a ViT's truncated-normal init
    elif cfg.init == "random" or base_init == "random":
        model = _reinit(model)
        info["init"] = "random"
    else:
        info["init"] = "teacher-svd"
        if calib_batches is not None and cfg.bn_recalib_batches:
            info["bn_recalibrated_batches"] = T.recalibrate_bn(model, calib_batches, cfg.bn_recalib_batches)
    if not info.get("converted") and not info.get("dropped_blocks") and cfg.width >= 1.0 and not cfg.arch:
        raise InputError("the student would be a copy of the teacher (no standard convolution to make separable): "
                         "shrink it with --width or --depth, or give --speedup X or --latency-budget MS to search")
    return model, recipe, info


def _record(recipe: dict[str, Any] | None, transform: dict[str, Any]) -> None:
    if recipe is not None:
        recipe["transforms"].append(transform)


def _reinit(model: Any) -> Any:
    from torch import nn

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
            m.reset_running_stats()
    return model
