"""Built-in architectures: the CIFAR ResNets of He et al. 2016 (section 4.2) and small CNNs.

Key names follow the widely shared CIFAR ResNet code (``conv1``, ``bn1``, ``layer{1,2,3}.{i}``,
``linear``) so pretrained state dicts from it load as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.registry import Registry

ARCHS: Registry = Registry("architecture")


def _canonical_map(in_planes: int, out_planes: int) -> list[int]:
    extra = out_planes - in_planes
    return [-1] * (extra // 2) + list(range(in_planes)) + [-1] * (extra - extra // 2)


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by stride 2 and zero-pad the new channels (no parameters).

    The ``channel_index`` buffer maps each output channel to an input channel, or -1 for a zero
    channel. Width shrinking edits it, and it travels in the state dict so that a shrunk student
    rebuilds exactly from its weights. The canonical even padding exports as a plain Pad.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 2) -> None:
        super().__init__()
        self.in_planes, self.stride = in_planes, stride
        self.register_buffer("channel_index", torch.tensor(_canonical_map(in_planes, out_planes), dtype=torch.long))
        self.canonical = True
        self.out_planes = out_planes  # a plain int, so tracing for export sees a constant

    def channel_map(self) -> list[int]:
        return [int(v) for v in self.channel_index.tolist()]

    def set_map(self, index: list[int], in_planes: int) -> None:
        self.channel_index = torch.tensor(index, dtype=torch.long)
        self.in_planes = in_planes
        self.out_planes = len(index)
        self.canonical = index == _canonical_map(in_planes, len(index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.canonical:
            extra = self.out_planes - self.in_planes
            return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2)) if extra else x
        src = torch.cat([torch.zeros_like(x[:, :1]), x], 1)  # slot 0 is the zero channel
        return src.index_select(1, self.channel_index + 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        key = prefix + "channel_index"
        if key in state_dict:
            idx = [int(v) for v in state_dict[key].tolist()]
            self.set_map(idx, max(idx) + 1 if max(idx) >= 0 else 0)
            self.channel_index = state_dict[key].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.in_planes}->{self.out_planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; ``width`` scales the 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        w = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.in_planes = w[0]
        self.layer1 = self._make_layer(w[0], n, 1)
        self.layer2 = self._make_layer(w[1], n, 2)
        self.layer3 = self._make_layer(w[2], n, 2)
        self.linear = nn.Linear(w[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _cifar(depth: int):
    def build(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, width)

    build.__name__ = f"cifar_resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016, option-A shortcuts)"
    return build


# What each built-in architecture says about its input, for the resolution order in
# kdtoolkit.data.inputspec (flags, model metadata, this table, the data). Only what the architecture
# itself fixes: the CIFAR ResNets are built for 3x32x32. No mean/std here: that belongs to the
# weights, not the architecture (the shared CIFAR weights use ImageNet's, others use CIFAR's own).
# small_cnn has no entry: it is built for 28x28 to 64x64 inputs of 1 or 3 channels, so its channels
# come from its weights (first conv) and its size from the data or --input-shape.
ARCH_INPUTS: dict[str, dict[str, Any]] = {}

for _d in (8, 14, 20, 32, 44, 56, 110):
    ARCHS.register(f"cifar_resnet{_d}")(_cifar(_d))
    ARCH_INPUTS[f"cifar_resnet{_d}"] = {"channels": 3, "input_size": (32, 32)}


def arch_input(name: str) -> dict[str, Any] | None:
    """The zoo's input facts for ``name`` (None when the architecture fixes nothing or is not in the zoo)."""
    v = ARCH_INPUTS.get(name)
    return dict(v) if v is not None else None


class SmallCNN(nn.Module):
    """A compact conv net for 28x28 to 64x64 inputs (MNIST-like data, the built-in demo)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c = [max(1, int(round(v * width))) for v in (32, 64, 96, 128)]

        def block(i: int, o: int, s: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, c[0], 1), *block(c[0], c[1], 2), *block(c[1], c[2], 1), *block(c[2], c[3], 2)
        )
        self.classifier = nn.Linear(c[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@ARCHS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> SmallCNN:
    """Four conv/BN/ReLU layers and a linear head."""
    return SmallCNN(num_classes, in_channels, width)


def cifar_vit(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, *, img_size: int = 32, patch_size: int = 4,
              embed_dim: int = 192, depth: int = 6, num_heads: int = 3, mlp_ratio: float = 2.0,
              class_token: bool = True, distilled: bool = False) -> nn.Module:
    """A small ViT for 32x32 images (patch 4: 64 tokens + class token), built on timm's VisionTransformer.

    Why timm's class: one transformer code path (block selection, head pruning, attention taps, export)
    serves timm teachers and the zoo's own. ``width`` scales the embedding (kept a multiple of the heads);
    ``distilled`` adds DeiT's distillation token and head (the two heads are averaged at inference)."""
    from kdtoolkit.errors import InputError, lazy_import

    lazy_import("timm", extra="vit", purpose="the cifar_vit architecture")
    from timm.models.vision_transformer import VisionTransformer

    if embed_dim % num_heads:
        raise InputError(f"cifar_vit: {num_heads} heads do not divide the embedding width {embed_dim}")
    dim = max(num_heads, int(round(embed_dim * width / num_heads)) * num_heads)
    if img_size % patch_size:
        raise InputError(f"cifar_vit: patch size {patch_size} does not divide image size {img_size}")
    kw = dict(img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=num_classes, embed_dim=dim,
              depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_token=class_token,
              global_pool="token" if class_token else "avg", qkv_bias=True)
    if distilled:
        from timm.models.deit import VisionTransformerDistilled

        return VisionTransformerDistilled(**kw)
    return VisionTransformer(**kw)


ARCHS.register("cifar_vit")(cifar_vit)
ARCH_INPUTS["cifar_vit"] = {"channels": 3, "input_size": (32, 32)}


@ARCHS.register("cifar_deit")
def cifar_deit(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, *, img_size: int = 32, **kw: Any) -> nn.Module:
    """cifar_vit with DeiT's distillation token and head: the student a CNN teacher distils into (--student-arch)."""
    return cifar_vit(num_classes, in_channels, width, img_size=img_size, distilled=True, **kw)


ARCH_INPUTS["cifar_deit"] = ARCH_INPUTS["cifar_vit"]
