"""The trainer's EMA of weights, mixup and cutmix, checked against values computed by hand.

Each test fails when its feature is removed: EMA off gives the raw weights, mixing off gives clean
batches and hard-label losses.
"""

from __future__ import annotations

from typing import Self

import numpy as np
import pytest
import torch
from helpers import TrainForwards, constant_level_to_index, label_of_pixel, linear_model, np_soft_ce, pixel_splits

from kdtoolkit.config import LossConfig, TrainConfig
from kdtoolkit.distill.trainer import Trainer


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 1, "batch_size": 16, "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
            "grad_clip": None, "channels_last": False, "seed": 0, "loss": LossConfig(name="ce")}
    base.update(kw)
    return TrainConfig(**base)


class _StepWeights:
    """The student's weights right after every optimiser step (a global torch hook: no trainer internals)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.after = module, []

    def __enter__(self) -> Self:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._h = register_optimizer_step_post_hook(
            lambda *_: self.after.append({k: v.detach().clone() for k, v in self.module.state_dict().items()}))
        return self

    def __exit__(self, *exc: object) -> None:
        self._h.remove()


# -- EMA -----------------------------------------------------------------------------------------
def test_ema_weights_are_the_hand_computed_average_and_are_what_fit_returns_and_saves(tmp_path) -> None:
    splits = pixel_splits("onehot")
    decay = 0.6
    student = linear_model(64, 4)
    w0 = {k: v.detach().clone() for k, v in student.state_dict().items()}
    with _StepWeights(student) as rec:
        res = Trainer(_cfg(max_steps=3, ema_decay=decay), tmp_path / "ema", progress=False).fit(student, splits)
    assert res["steps"] == 3 and len(rec.after) == 3
    # e_0 = w_0, e_k = d * e_{k-1} + (1 - d) * w_k (in float32, in this order)
    ema = {k: v.clone() for k, v in w0.items()}
    for w in rec.after:
        ema = {k: e * decay + w[k] * (1 - decay) for k, e in ema.items()}
    got = res["model"].state_dict()
    raw_last = rec.after[-1]
    for k, e in ema.items():
        torch.testing.assert_close(got[k], e, rtol=0, atol=1e-6)
        # and it is not the raw weights: the steps were large enough for the difference to be far above float noise
        assert (got[k] - raw_last[k]).abs().max() > 1e-2, k
    # the saved best checkpoint is the EMA, and validation was measured on it
    best = torch.load(tmp_path / "ema" / "best.pt", map_location="cpu", weights_only=True)
    for k, e in ema.items():
        torch.testing.assert_close(best[k], e, rtol=0, atol=1e-6)
    from kdtoolkit.evaluate import evaluate

    val_acc_ema = evaluate(res["model"], splits.val, splits.spec)["accuracy"]
    assert res["history"][0]["val_accuracy"] == pytest.approx(val_acc_ema)


def test_ema_off_returns_the_raw_weights_of_the_same_run(tmp_path) -> None:
    """The control for the test above: without EMA the same three steps hand back the raw weights."""
    splits = pixel_splits("onehot")
    student = linear_model(64, 4)
    with _StepWeights(student) as rec:
        res = Trainer(_cfg(max_steps=3), tmp_path / "raw", progress=False).fit(student, splits)
    for k, v in res["model"].state_dict().items():
        torch.testing.assert_close(v, rec.after[-1][k], rtol=0, atol=0)


# -- mixup / cutmix ------------------------------------------------------------------------------
def _history_loss(res: dict) -> float:
    (rec,) = res["history"]
    return rec["train_loss"]


def test_mixup_trains_on_blended_images_with_blended_targets(tmp_path) -> None:
    """One-hot-pixel images: a mixed image lam*x_i + (1-lam)*x_j carries lam at pixel i and 1-lam at pixel j,
    so the target each image should have is read off its pixels; the loss must be CE against exactly that."""
    splits = pixel_splits("onehot")
    lab = label_of_pixel(splits)
    n_cls = len(splits.spec.classes)
    student = linear_model(64, n_cls)
    with TrainForwards(student) as rec:
        res = Trainer(_cfg(max_steps=3, mixup=1.0), tmp_path, progress=False).fit(student, splits)
    assert len(rec.inputs) == 3
    losses, hard_losses, lams = [], [], []
    for x, out in zip(rec.inputs, rec.outputs):
        px = x.reshape(len(x), -1).numpy().astype(np.float64)
        assert (px >= -1e-6).all() and np.allclose(px.sum(1), 1.0, atol=1e-5)  # convex blends of two one-hot images
        nz = np.sort(px, 1)[:, ::-1]
        lam = nz[:, 0]
        mixed = nz[:, 1] > 1e-6  # samples paired with another one (a sample paired with itself stays clean)
        assert mixed.sum() >= len(x) // 2
        # one lam per batch: every mixed sample holds the same two weights
        assert np.allclose(np.maximum(nz[mixed, 0], nz[mixed, 1]), lam[mixed][0], atol=1e-5)
        lams.append(lam[mixed][0])
        target = np.zeros((len(x), n_cls))
        for c in range(n_cls):
            target[:, c] = px[:, lab == c].sum(1)
        losses.append(np_soft_ce(out.numpy(), target))
        hard_losses.append(np_soft_ce(out.numpy(), np.eye(n_cls)[target.argmax(1)]))
    assert any(0.05 < max(v, 1 - v) < 0.95 for v in lams), lams  # a real blend happened at least once
    assert _history_loss(res) == pytest.approx(np.mean(losses), rel=1e-5)
    assert abs(np.mean(losses) - np.mean(hard_losses)) > 1e-3  # the hard-label loss is measurably different


def _bounding_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.where(mask)
    box = np.zeros_like(mask)
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    return box


def test_cutmix_pastes_a_box_from_another_image_and_weights_targets_by_area(tmp_path) -> None:
    """Uniform-grey images whose level names the sample: a cut-mixed image is one sample outside a box and
    another inside it; its target is each sample's label weighted by its share of the pixels."""
    splits = pixel_splits("constant")
    n_cls = len(splits.spec.classes)
    student = linear_model(64, n_cls)
    with TrainForwards(student) as rec:
        res = Trainer(_cfg(max_steps=3, cutmix=1.0), tmp_path, progress=False).fit(student, splits)
    assert len(rec.inputs) == 3
    losses, clean_losses, areas = [], [], []
    for x, out in zip(rec.inputs, rec.outputs):
        idx = constant_level_to_index(x[:, 0].numpy())  # N, H, W: which training sample each pixel came from
        assert (idx >= 0).all() and (idx < len(splits.train)).all()
        labels = splits.train.y[idx]
        target = np.stack([(labels == c).mean((1, 2)) for c in range(n_cls)], 1)  # label shares by area
        # each image holds at most two samples, split by one rectangle shared by the whole batch
        two = [i for i in idx if len(np.unique(i)) == 2]
        assert all(len(np.unique(i)) <= 2 for i in idx)
        masks = [i == i[0, 0] for i in two]
        assert all((m == masks[0]).all() or (m != masks[0]).all() for m in masks)
        if masks:
            # the pasted region (the mask or its complement: the box may hold the corner) is a rectangle
            assert any((m == _bounding_box(m)).all() for m in (masks[0], ~masks[0]))
            areas.append(float(min(masks[0].mean(), 1 - masks[0].mean())))
        losses.append(np_soft_ce(out.numpy(), target))
        clean_losses.append(np_soft_ce(out.numpy(), np.eye(n_cls)[target.argmax(1)]))
    assert areas and max(areas) > 0.05, areas  # a real box was pasted at least once
    assert _history_loss(res) == pytest.approx(np.mean(losses), rel=1e-5)
    assert abs(np.mean(losses) - np.mean(clean_losses)) > 1e-3
