"""The teacher view bank (FKD): augmented training without the live teacher, the views replayed exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TrainForwards, make_splits
from torch import nn

from kdtoolkit.config import TrainConfig
from kdtoolkit.data.datasets import to_tensor
from kdtoolkit.distill.trainer import Trainer, ViewBank


class CountingTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 64, 5)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int(x.shape[0]))
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _splits(n: int = 32):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)  # random pixels: a crop/flip of image i is unique to it
    y = rng.integers(0, 5, n)
    return make_splits((x, y), (x[:8], y[:8]), (x[:8], y[:8]), 5)


def test_view_bank_trains_on_its_stored_views_without_the_live_teacher(tmp_path):
    splits = _splits()
    teacher = CountingTeacher().eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.01, augment="crop_flip", augment_views=3, seed=0, channels_last=False)
    with TrainForwards(student) as rec:
        Trainer(cfg, tmp_path / "work", progress=False).fit(student, splits, teacher=teacher)
    assert 8 not in teacher.batch_sizes  # no training step ran the teacher: its logits came from the bank
    bank = ViewBank(teacher, splits.train, splits.spec, next((tmp_path / "work").glob("teacher_views_*.npy")), views=3,
                    mode="crop_flip", seed=0)
    x_all = to_tensor(splits.train.x, splits.spec)
    n = len(splits.train)
    idx = torch.arange(n)
    stored = torch.stack([bank.augment(x_all, idx, v) for v in range(3)])  # views x n x C x H x W
    # the bank holds the teacher's logits of exactly those views (ONNX Runtime against torch)
    with torch.no_grad():
        want = torch.stack([teacher(stored[v]) for v in range(3)]).numpy()
    np.testing.assert_allclose(bank.logits, want, rtol=1e-4, atol=1e-4)
    # every image the student trained on is one of the stored views of a training image
    seen = torch.cat(rec.inputs)
    assert len(seen) == 2 * (n // 8) * 8
    flat = stored.reshape(3 * n, -1)
    for row in seen.reshape(len(seen), -1):
        assert torch.isclose(flat, row[None], atol=1e-6).all(1).any()
    # and an epoch uses a spread of views, not one
    assert len({int(v) for v in bank.view_of(idx, 0)}) == 3


def test_view_bank_is_deterministic_and_reused(tmp_path):
    splits = _splits()
    teacher = CountingTeacher().eval()
    path = tmp_path / "bank.npy"
    a = ViewBank(teacher, splits.train, splits.spec, path, views=2, mode="crop_flip", seed=3)
    mtime = path.stat().st_mtime_ns
    b = ViewBank(teacher, splits.train, splits.spec, path, views=2, mode="crop_flip", seed=3)
    assert path.stat().st_mtime_ns == mtime  # the teacher ran once
    assert torch.equal(a.dy, b.dy) and torch.equal(a.flip, b.flip)
    with pytest.raises(Exception, match="delete it"):
        ViewBank(teacher, splits.train, splits.spec, path, views=3, mode="crop_flip", seed=3)


def test_view_bank_refuses_mixup(tmp_path):
    from kdtoolkit.errors import InputError

    cfg = TrainConfig(epochs=1, batch_size=8, augment="crop", augment_views=2, mixup=0.2, channels_last=False)
    with pytest.raises(InputError, match="augment_views"):
        Trainer(cfg, tmp_path / "w", progress=False).fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), _splits(),
                                                         teacher=CountingTeacher().eval())


@pytest.mark.parametrize("min_agreement", [0.0, 1.01])
def test_view_bank_runs_the_teacher_in_the_precision_that_measured_faster_and_agrees(tmp_path, monkeypatch, min_agreement):
    """The bank's teacher is its INT8 ONNX only where that measured faster here and agrees on top-1; the choice is recorded."""
    import json

    splits = _splits(96)
    monkeypatch.setattr(ViewBank, "MIN_AGREEMENT", min_agreement)
    path = tmp_path / "bank.npy"
    bank = ViewBank(CountingTeacher().eval(), splits.train, splits.spec, path, views=2, mode="crop_flip", seed=0)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["views"] == 2 and info["images"] == len(splits.train)
    faster = info["int8_s_per_256"] < info["fp32_s_per_256"]
    if min_agreement > 1:  # no INT8 teacher can agree on more than all images: FP32, and the run says why
        assert info["runtime"] == "onnxruntime fp32" and "agrees on only" in info["why"]
    else:
        assert info["runtime"] == ("onnxruntime int8" if faster else "onnxruntime fp32"), info
    with torch.no_grad():  # the stored logits are the chosen runtime's: exact for FP32, close for INT8
        want = CountingTeacher().eval()(bank.augment(to_tensor(splits.train.x, splits.spec), torch.arange(len(splits.train)), 0)).numpy()
    tol = 1e-4 if info["runtime"].endswith("fp32") else 0.5
    np.testing.assert_allclose(bank.logits[0], want, atol=tol)


def test_labels_alone_never_runs_the_teacher_it_was_handed(tmp_path):
    """loss ce (the student-alone row of the headline) with a teacher and a view bank asked: no bank, no teacher call."""
    from kdtoolkit.config import LossConfig

    splits = _splits()
    teacher = CountingTeacher().eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, augment="crop_flip", augment_views=3, seed=0, channels_last=False,
                      loss=LossConfig(name="ce"))
    Trainer(cfg, tmp_path / "work", progress=False).fit(student, splits, teacher=teacher)
    assert teacher.batch_sizes == []
    assert not list((tmp_path / "work").glob("teacher_*.npy"))
