"""Golden values for every registered loss, computed independently with plain numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtoolkit.distill.losses import FEATURE_LOSSES, LOSSES, teacher_weights
from kdtoolkit.distill.schedules import Schedule, lr_factor


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_ce(s: np.ndarray, y: np.ndarray, eps: float = 0.0) -> float:
    k = s.shape[1]
    q = np.full(s.shape, eps / k)
    q[np.arange(len(y)), y] += 1 - eps
    return float(-(q * _log_softmax(s)).sum(1).mean())


def _np_kl(t: np.ndarray, s: np.ndarray, temp: float) -> np.ndarray:
    """Per-sample KL(softmax(t/T) || softmax(s/T))."""
    lt, ls = _log_softmax(t / temp), _log_softmax(s / temp)
    return (np.exp(lt) * (lt - ls)).sum(-1)


RNG = np.random.default_rng(0)
S = RNG.normal(size=(6, 5)).astype(np.float64)
T1 = (2 * RNG.normal(size=(6, 5))).astype(np.float64)
T2 = RNG.normal(size=(6, 5)).astype(np.float64)
Y = np.array([0, 1, 2, 3, 4, 0])


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


@pytest.mark.parametrize("alpha,temp,eps", [(0.9, 4.0, 0.0), (0.5, 2.0, 0.1), (0.0, 3.0, 0.2), (1.0, 1.0, 0.0)])
def test_hinton_kd_golden(alpha: float, temp: float, eps: float) -> None:
    got = LOSSES.get("kd")(_t(S), _t(T1), torch.tensor(Y), alpha=alpha, temperature=temp, label_smoothing=eps).item()
    want = alpha * temp**2 * _np_kl(T1, S, temp).mean() + (1 - alpha) * _np_ce(S, Y, eps)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_hinton_kd_hand_computed_two_classes() -> None:
    # s = (0, 0), t = (ln 3, 0) at T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2)
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2); CE(label 0) = ln 2
    got = LOSSES.get("kd")(torch.zeros(1, 2, dtype=torch.float64), torch.tensor([[np.log(3), 0.0]], dtype=torch.float64),
                           torch.tensor([0]), alpha=0.5, temperature=1.0).item()
    want = 0.5 * (0.75 * np.log(1.5) + 0.25 * np.log(0.5)) + 0.5 * np.log(2)
    assert got == pytest.approx(want, rel=1e-12)


def test_ce_golden_and_no_teacher() -> None:
    assert LOSSES.get("ce")(_t(S), None, torch.tensor(Y), label_smoothing=0.1).item() == pytest.approx(_np_ce(S, Y, 0.1), rel=1e-9)
    assert LOSSES.get("kd")(_t(S), None, torch.tensor(Y), alpha=0.9).item() == pytest.approx(_np_ce(S, Y), rel=1e-9)


@pytest.mark.parametrize("mode", ["fixed", "confidence", "ce"])
def test_multi_teacher_golden(mode: str) -> None:
    alpha, temp = 0.7, 3.0
    stack = np.stack([T1, T2])
    if mode == "fixed":
        w = np.array([[0.25], [0.75]]) * np.ones((2, 6))
    elif mode == "confidence":
        conf = np.exp(_log_softmax(stack)).max(-1)
        w = conf / conf.sum(0)
    else:
        ce = -np.take_along_axis(_log_softmax(stack), Y[None, :, None].repeat(2, 0), -1)[..., 0]
        w = np.exp(-ce) / np.exp(-ce).sum(0)
    kl = np.stack([_np_kl(T1, S, temp), _np_kl(T2, S, temp)])
    want = alpha * temp**2 * (w * kl).sum(0).mean() + (1 - alpha) * _np_ce(S, Y)
    got = LOSSES.get("multi_kd")(_t(S), _t(stack), torch.tensor(Y), alpha=alpha, temperature=temp, weighting=mode,
                                 weights=[1.0, 3.0] if mode == "fixed" else None).item()
    assert got == pytest.approx(want, rel=1e-9)
    assert teacher_weights(_t(stack), torch.tensor(Y), mode, [1.0, 3.0]).sum(0).numpy() == pytest.approx(np.ones(6))


def test_kd_with_stacked_teachers_is_equal_weight_multi_kd() -> None:
    stack = _t(np.stack([T1, T2]))
    a = LOSSES.get("kd")(_t(S), stack, torch.tensor(Y), alpha=0.9, temperature=4.0).item()
    kl = (_np_kl(T1, S, 4.0) + _np_kl(T2, S, 4.0)) / 2
    assert a == pytest.approx(0.9 * 16 * kl.mean() + 0.1 * _np_ce(S, Y), rel=1e-9)


def test_hint_loss_golden() -> None:
    s = RNG.normal(size=(2, 3, 4, 4))
    t = RNG.normal(size=(2, 3, 4, 4))
    s2, t2 = RNG.normal(size=(2, 3, 4, 4)), RNG.normal(size=(2, 3, 2, 2))
    # the second student map is pooled 2x2 to the teacher's size
    s2p = s2.reshape(2, 3, 2, 2, 2, 2).mean((3, 5))
    want = (((s - t) ** 2).mean() + ((s2p - t2) ** 2).mean()) / 2
    got = FEATURE_LOSSES.get("hint")([_t(s), _t(s2)], [_t(t), _t(t2)]).item()
    assert got == pytest.approx(want, rel=1e-9)


def test_attention_transfer_golden() -> None:
    s = RNG.normal(size=(2, 3, 4, 4))
    t = RNG.normal(size=(2, 5, 4, 4))  # channel counts may differ: AT needs no adapter

    def at(x: np.ndarray) -> np.ndarray:
        q = (x**2).mean(1).reshape(len(x), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    want = ((at(s) - at(t)) ** 2).mean()
    assert FEATURE_LOSSES.get("at")([_t(s)], [_t(t)]).item() == pytest.approx(want, rel=1e-9)


def test_feature_losses_train_student_only() -> None:
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    (FEATURE_LOSSES.get("hint")([s], [t]) + FEATURE_LOSSES.get("at")([s], [t])).backward()
    assert s.grad is not None and t.grad is None


def test_schedules_and_lr() -> None:
    assert Schedule(start=4.0).at(0.7) == 4.0
    assert Schedule(start=8.0, end=2.0, kind="linear").at(0.25) == pytest.approx(6.5)
    assert Schedule(start=8.0, end=2.0, kind="cosine").at(0.5) == pytest.approx(5.0)
    assert Schedule(start=8.0, end=2.0, kind="cosine").at(1.0) == pytest.approx(2.0)
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 110, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(60, 110, 10, "linear") == pytest.approx(0.5)


def test_unknown_loss_lists_known() -> None:
    from kdtoolkit.errors import InputError

    with pytest.raises(InputError, match="known: ce, dist, dkd, kd, multi_kd"):
        LOSSES.get("crd")
