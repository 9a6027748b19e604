"""Feature distillation: FitNets hints and attention transfer, by hand and inside the trainer.

tests/test_losses.py checks the loss functions against numpy re-implementations; the trainer test
there (tests/test_trainer.py::test_hints_and_at_train_and_adapters_stay_out_of_the_student) passes
with both terms deleted from the trainer's loss. These tests pin the values by hand and check that
the trainer's loss is CE + weight * (the term computed from the features it really produced).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import pixel_splits

from kdtoolkit.config import LossConfig, TrainConfig
from kdtoolkit.distill.losses import FEATURE_LOSSES
from kdtoolkit.distill.trainer import Trainer
from kdtoolkit.models.zoo import small_cnn


# -- the losses, by hand ---------------------------------------------------------------------------
def test_hint_loss_by_hand_same_size_and_pooled() -> None:
    """FitNets (Romero et al. 2015): MSE(adapted student feature, teacher feature), averaged over pairs."""
    s1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    t1 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)  # (1 + 4 + 9 + 16) / 4 = 7.5
    t2 = torch.tensor([[[[0.5]]]], dtype=torch.float64)  # the 2x2 student map is average-pooled to 1x1: 2.5; (2.5 - 0.5)^2 = 4
    assert FEATURE_LOSSES.get("hint")([s1], [t1]).item() == pytest.approx(7.5, rel=1e-12)
    assert FEATURE_LOSSES.get("hint")([s1, s1], [t1, t2]).item() == pytest.approx((7.5 + 4.0) / 2, rel=1e-12)
    assert FEATURE_LOSSES.get("hint")([t1], [t1]).item() == 0.0


def test_attention_transfer_by_hand() -> None:
    """Zagoruyko & Komodakis 2017: Q = mean_c A^2 flattened and L2-normalised; loss = mean_j (Q_s - Q_t)_j^2,
    as in the paper's reference code (mean of squares over positions, not the unsquared p-norm of the paper's eq. 2).

    student map [[3, 0], [0, -4]] -> Q = (9, 0, 0, 16) / sqrt(337); teacher [[1, 0], [0, 0]] -> (1, 0, 0, 0);
    sum of squared differences = 81/337 + 256/337 + 1 - 18/sqrt(337) = 2 - 18/sqrt(337); over 4 positions."""
    s = torch.tensor([[[[3.0, 0.0], [0.0, -4.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    want = (2 - 18 / math.sqrt(337)) / 4
    assert FEATURE_LOSSES.get("at")([s], [t]).item() == pytest.approx(want, rel=1e-12)
    # channels are averaged (the teacher may have more): two teacher channels (1, 0, 0, 0) and (1, 0, 0, 0) give the same Q
    t2 = torch.cat([t, t], 1)
    assert FEATURE_LOSSES.get("at")([s], [t2]).item() == pytest.approx(want, rel=1e-12)
    # the map is scale-free: a teacher ten times larger gives the same loss; a matching attention gives 0
    assert FEATURE_LOSSES.get("at")([s], [10 * t]).item() == pytest.approx(want, rel=1e-12)
    assert FEATURE_LOSSES.get("at")([s], [-s]).item() == pytest.approx(0.0, abs=1e-15)
    # pairs are summed
    assert FEATURE_LOSSES.get("at")([s, s], [t, t]).item() == pytest.approx(2 * want, rel=1e-12)


# -- inside the trainer ----------------------------------------------------------------------------
PAIR = "features.2:features.2"  # first conv block's ReLU (8x8) in both small_cnns


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = small_cnn(4, 1, 0.5)
    torch.manual_seed(1)
    student = small_cnn(4, 1, 0.25)
    return teacher, student


def _first_step_loss(tmp_path, name: str, loss: LossConfig, hooks: dict | None = None) -> float:
    """The loss of the first optimiser step (history's train_loss of a 1-step run), with optional recordings."""
    splits = pixel_splits("constant")
    teacher, student = _models()
    handles = []
    rec: dict[str, list[torch.Tensor]] = {"s": [], "t": [], "adapter": []}
    if hooks is not None:
        def keep(key: str):
            def fn(m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
                # a training batch: the trainer's probes use batch 1, validation runs the student in eval mode
                if out.shape[0] == 16 and (key == "t" or m.training):
                    rec[key].append(out.detach().clone())
            return fn

        handles.append(dict(student.named_modules())["features.2"].register_forward_hook(keep("s")))
        handles.append(dict(teacher.named_modules())["features.2"].register_forward_hook(keep("t")))

        def adapter_hook(m: torch.nn.Module, _i: object, out: torch.Tensor) -> None:
            if type(m).__name__ == "HintAdapter" and m.training:
                rec["adapter"].append(out.detach().clone())

        handles.append(torch.nn.modules.module.register_module_forward_hook(adapter_hook))
    cfg = TrainConfig(epochs=1, max_steps=1, batch_size=16, channels_last=False, seed=0, loss=loss)
    try:
        res = Trainer(cfg, tmp_path / name, progress=False).fit(student, splits, teacher=teacher)
    finally:
        for h in handles:
            h.remove()
    if hooks is not None:
        hooks.update(rec)
    return res["history"][0]["train_loss"]


def test_hint_weight_adds_weight_times_adapter_mse_to_the_trainer_loss(tmp_path) -> None:
    base = _first_step_loss(tmp_path, "w0", LossConfig(alpha={"start": 0.0}))
    rec: dict = {}
    w = 2.5
    with_hint = _first_step_loss(tmp_path, "w", LossConfig(alpha={"start": 0.0}, hint_weight=w, hints=[PAIR]), rec)
    assert len(rec["adapter"]) == 1 and len(rec["t"]) == 1
    a, t = rec["adapter"][0], rec["t"][0]
    assert a.shape == t.shape  # the adapter maps the student's 8 channels to the teacher's 16
    hint = float(((a.double() - t.double()) ** 2).mean())
    assert hint > 1e-3
    assert with_hint - base == pytest.approx(w * hint, rel=1e-4)
    # and the term scales with its weight
    twice = _first_step_loss(tmp_path, "w2", LossConfig(alpha={"start": 0.0}, hint_weight=2 * w, hints=[PAIR]))
    assert twice - base == pytest.approx(2 * w * hint, rel=1e-4)


def test_at_weight_adds_weight_times_attention_loss_of_the_real_features_to_the_trainer_loss(tmp_path) -> None:
    base = _first_step_loss(tmp_path, "a0", LossConfig(alpha={"start": 0.0}))
    rec: dict = {}
    w = 100.0
    with_at = _first_step_loss(tmp_path, "a", LossConfig(alpha={"start": 0.0}, at_weight=w, at_layers=[PAIR]), rec)
    assert len(rec["s"]) == 1 and len(rec["t"]) == 1
    s, t = rec["s"][0].double().numpy(), rec["t"][0].double().numpy()

    def q(x: np.ndarray) -> np.ndarray:
        m = (x**2).mean(1).reshape(len(x), -1)
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    at = float(((q(s) - q(t)) ** 2).mean())
    assert at > 1e-6
    assert with_at - base == pytest.approx(w * at, rel=1e-4)
