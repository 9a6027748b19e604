"""DKD (Zhao et al. 2022) and DIST (Huang et al. 2022) against values computed by hand with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtoolkit.distill.losses import LOSSES, dist_loss, dkd_loss, kd_loss

S = np.array([[1.0, 2.0, 0.5, -0.3], [0.2, -1.0, 3.0, 0.7], [0.0, 0.4, -0.2, 1.1]])
T_ = np.array([[2.0, 1.0, 0.0, 0.5], [0.0, 0.0, 4.0, -1.0], [1.5, -0.5, 0.3, 2.0]])
Y = np.array([1, 2, 3])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dkd_by_hand(s, t, y, temp, wt, wn):
    tck, nck = [], []
    for i in range(len(y)):
        ps, pt = _softmax(s[i] / temp), _softmax(t[i] / temp)
        bs, bt = np.array([ps[y[i]], 1 - ps[y[i]]]), np.array([pt[y[i]], 1 - pt[y[i]]])
        tck.append((bt * np.log(bt / bs)).sum())
        keep = np.arange(len(s[i])) != y[i]
        qs, qt = _softmax(s[i][keep] / temp), _softmax(t[i][keep] / temp)
        nck.append((qt * np.log(qt / qs)).sum())
    return temp**2 * (wt * np.mean(tck) + wn * np.mean(nck))


def _t(a):
    return torch.tensor(a, dtype=torch.float32)


def test_dkd_matches_the_paper_by_hand():
    got = dkd_loss(_t(S), _t(T_), torch.tensor(Y), alpha=1.0, temperature=2.0).item()
    assert got == pytest.approx(_dkd_by_hand(S, T_, Y, 2.0, 1.0, 8.0), rel=1e-5)
    # alpha mixes in cross-entropy exactly as Hinton KD does
    ce = torch.nn.functional.cross_entropy(_t(S), torch.tensor(Y)).item()
    mixed = dkd_loss(_t(S), _t(T_), torch.tensor(Y), alpha=0.25, temperature=2.0).item()
    assert mixed == pytest.approx(0.25 * _dkd_by_hand(S, T_, Y, 2.0, 1.0, 8.0) + 0.75 * ce, rel=1e-5)


def test_dkd_reformulates_kd():
    """The paper's identity: KD = TCKD + (1 - p_t[target]) * NCKD (one sample, so the batch mean is that sample)."""
    s, t, y = _t(S[:1]), _t(T_[:1]), torch.tensor(Y[:1])
    w = 1 - _softmax(T_[0] / 3.0)[Y[0]]
    assert dkd_loss(s, t, y, alpha=1.0, temperature=3.0, tckd_weight=1.0, nckd_weight=float(w)).item() == \
        pytest.approx(kd_loss(s, t, y, alpha=1.0, temperature=3.0).item(), rel=1e-5)


def test_dkd_takes_soft_targets_from_mixup():
    soft = torch.nn.functional.one_hot(torch.tensor(Y), 4).float() * 0.7 + 0.075
    got = dkd_loss(_t(S), _t(T_), soft, alpha=1.0, temperature=2.0).item()
    assert got == pytest.approx(_dkd_by_hand(S, T_, Y, 2.0, 1.0, 8.0), rel=1e-5)


def _pearson_gap(a, b):
    return np.mean([1 - np.corrcoef(a[i], b[i])[0, 1] for i in range(len(a))])


def test_dist_matches_the_paper_by_hand():
    temp = 2.0
    ys, yt = _softmax(S / temp), _softmax(T_ / temp)
    want = temp**2 * (_pearson_gap(ys, yt) + _pearson_gap(ys.T, yt.T))
    assert dist_loss(_t(S), _t(T_), torch.tensor(Y), alpha=1.0, temperature=temp).item() == pytest.approx(want, rel=1e-4)
    assert dist_loss(_t(T_), _t(T_), torch.tensor(Y), alpha=1.0, temperature=temp).item() == pytest.approx(0.0, abs=1e-6)


def test_new_losses_are_registered_and_configurable():
    from kdtoolkit.config import LossConfig

    assert LOSSES.get("dkd") is dkd_loss and LOSSES.get("dist") is dist_loss
    assert LossConfig(name="dkd").name == "dkd"
    with pytest.raises(ValueError, match="dkd"):
        LossConfig(name="dkdd")
