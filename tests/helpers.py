"""Shared test helpers: tiny in-memory datasets whose pixels identify their sample, tiny deterministic
models, and recorders for what a model saw during training.

Import from test files as ``from helpers import ...`` (pytest puts tests/ on sys.path, as for conftest).
Everything here imports kdtoolkit lazily and only through its public modules, so a moved internal
module breaks one helper, not every test file at collection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from torch import nn


# -- datasets ------------------------------------------------------------------------------------
def spec_for(n_classes: int, size: int = 8, channels: int = 1, mean: float = 0.0, std: float = 1.0) -> Any:
    """A DataSpec with mean 0 / std 1 by default, so a uint8 pixel v becomes exactly v / 255 in the model."""
    from kdtoolkit.data import DataSpec

    return DataSpec("tests.helpers", (size, size), channels, (mean,) * channels, (std,) * channels,
                    [f"c{i}" for i in range(n_classes)])


def array_data(x: np.ndarray, y: np.ndarray, name: str = "") -> Any:
    """uint8 N,H,W,C images (N,H,W is promoted) and int labels as the toolkit's ArrayData."""
    from kdtoolkit.data import ArrayData

    x = np.asarray(x, np.uint8)
    if x.ndim == 3:
        x = x[..., None]
    return ArrayData(np.ascontiguousarray(x), np.asarray(y, np.int64), name)


def make_splits(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                n_classes: int) -> Any:
    """Splits from (x, y) pairs, with a mean-0/std-1 spec of the images' size and channels."""
    from kdtoolkit.data import Splits

    tr, va, te = array_data(*train, "train"), array_data(*val, "val"), array_data(*test, "test")
    return Splits(tr, va, te, spec_for(n_classes, tr.x.shape[1], tr.x.shape[-1]))


def onehot_pixel_images(n: int, size: int = 8) -> np.ndarray:
    """Image i is black with pixel i (row-major) at 255: a mixed image shows which samples it holds and how much of each."""
    assert n <= size * size
    x = np.zeros((n, size * size), np.uint8)
    x[np.arange(n), np.arange(n)] = 255
    return x.reshape(n, size, size)


def constant_images(n: int, size: int = 8) -> np.ndarray:
    """Image i is uniformly grey at level ``3 * i + 3``: a pixel's value names the sample it came from."""
    assert 3 * n + 3 <= 255
    return np.repeat((3 * np.arange(n) + 3).astype(np.uint8), size * size).reshape(n, size, size)


def constant_level_to_index(v: np.ndarray) -> np.ndarray:
    """Inverse of :func:`constant_images` on normalised [0, 1] pixel values."""
    return np.rint(np.asarray(v) * 255.0 / 3.0 - 1).astype(int)


def class_pixel_images(y: np.ndarray, size: int = 4, seed: int = 0) -> np.ndarray:
    """Pixel ``y`` at 255, the other pixels dim noise (< 60), the last pixel always 0: class = argmax of pixels 0..C-1."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(len(y), size * size)).astype(np.uint8)
    x[np.arange(len(y)), y] = 255
    x[:, -1] = 0
    return x.reshape(len(y), size, size)


def pixel_splits(kind: str, n_train: int = 64, n_val: int = 16, n_test: int = 16, n_classes: int = 4, size: int = 8) -> Any:
    """Splits whose training images identify themselves (``onehot`` or ``constant``), labels ``i % n_classes``."""
    make = {"onehot": onehot_pixel_images, "constant": constant_images}[kind]
    x = make(n_train, size)
    y = np.arange(n_train) % n_classes
    vy = np.arange(n_val) % n_classes
    ty = np.arange(n_test) % n_classes
    return make_splits((x, y), (x[:n_val], vy), (x[:n_test], ty), n_classes)


def label_of_pixel(splits: Any) -> np.ndarray:
    """For onehot-pixel data: the label of the sample that lights each pixel (-1 where none does)."""
    flat = splits.train.x.reshape(len(splits.train), -1)
    out = np.full(flat.shape[1], -1)
    who = flat.argmax(1)
    out[who] = splits.train.y
    return out


def save_npz(path: Path, splits: Any) -> Path:
    """Write train and test as the .npz the CLI reads with ``--data`` (train = train + val, as the CLI re-splits it)."""
    x_train = np.concatenate([splits.train.x, splits.val.x])
    y_train = np.concatenate([splits.train.y, splits.val.y])
    np.savez(path, x_train=x_train, y_train=y_train, x_test=splits.test.x, y_test=splits.test.y,
             class_names=np.array(splits.spec.classes))
    return path


# -- models --------------------------------------------------------------------------------------
def linear_model(in_features: int, n_classes: int, seed: int = 0) -> nn.Module:
    """Flatten + Linear: no BatchNorm, no dropout, so every weight is a plain parameter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, n_classes))


def constant_cnn(logits: list[float], in_channels: int = 1) -> nn.Module:
    """The zoo's small_cnn with every weight zero and the head's bias = ``logits``: it outputs ``logits``
    for any input, in train and eval mode alike (BatchNorm of zeros with zero gamma/beta is zero)."""
    from kdtoolkit.models.zoo import small_cnn

    m = small_cnn(len(logits), in_channels, 0.25)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.classifier.bias.copy_(torch.tensor(logits, dtype=torch.float32))
    return m


def save_constant_cnn(path: Path, logits: list[float], spec: Any, in_channels: int = 1) -> Path:
    """A kdtoolkit checkpoint (recipe + weights + input metadata) of :func:`constant_cnn`."""
    from kdtoolkit.models.loading import save_checkpoint

    m = constant_cnn(logits, in_channels)
    recipe = {"arch": "small_cnn", "arch_kwargs": {"num_classes": len(logits), "in_channels": in_channels, "width": 0.25},
              "transforms": []}
    save_checkpoint(path, m, recipe, spec.to_dict())
    return path


# -- recorders -----------------------------------------------------------------------------------
class TrainForwards:
    """Records (input, output) of every forward of ``module`` made in training mode."""

    def __init__(self, module: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._h = module.register_forward_hook(self._hook)

    def _hook(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if m.training:
            self.inputs.append(args[0].detach().clone().contiguous())
            self.outputs.append(out.detach().clone().contiguous())

    def remove(self) -> None:
        self._h.remove()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_soft_ce(logits: np.ndarray, target: np.ndarray) -> float:
    """Mean cross-entropy against soft targets (rows summing to 1)."""
    return float(-(np.asarray(target, np.float64) * np_log_softmax(logits)).sum(-1).mean())


def np_kl(p_logits: np.ndarray, q_logits: np.ndarray, temperature: float = 1.0) -> float:
    """KL(softmax(p/T) || softmax(q/T)) for single logit vectors."""
    lp, lq = np_log_softmax(np.asarray(p_logits) / temperature), np_log_softmax(np.asarray(q_logits) / temperature)
    return float((np.exp(lp) * (lp - lq)).sum())
