"""A training run sized to a time budget, and the ETA it reports."""

from __future__ import annotations

import time

import numpy as np
import torch
from helpers import make_splits
from torch import nn

from kdtoolkit.config import TrainConfig
from kdtoolkit.distill.trainer import Trainer


class Slow(nn.Module):
    """A linear model whose forward sleeps 5 ms, so a step's time is known whatever the machine."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.005)
        return self.fc(x.flatten(1))


def _splits():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (256, 8, 8), dtype=np.uint8), rng.integers(0, 4, 256)
    return make_splits((x, y), (x[:16], y[:16]), (x[:16], y[:16]), 4)


def test_time_budget_sizes_the_schedule_and_the_run_ends_near_it(tmp_path):
    budget_s = 3.0
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01, time_budget_min=budget_s / 60, channels_last=False)
    t0 = time.perf_counter()
    res = Trainer(cfg, tmp_path / "w", progress=False).fit(Slow(), _splits())
    took = time.perf_counter() - t0
    steps_per_epoch = 256 // 16
    # the budget, not epochs=1, decided the length: several epochs ran, and the run ended near the budget
    assert res["steps"] > 2 * steps_per_epoch
    assert 0.5 * budget_s < took < 3 * budget_s
    ckpt = torch.load(tmp_path / "w" / "last.pt", weights_only=True)
    assert ckpt.get("total") == res["steps"]  # a resumed run keeps the fitted schedule
    etas = [h["eta_s"] for h in res["history"][:-1]]
    assert etas and all(e is not None and 0 < e < 3 * budget_s for e in etas)
    assert res["history"][-1]["eta_s"] is None  # nothing left at the end
