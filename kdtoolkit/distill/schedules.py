"""Schedules for temperature and alpha over training progress t in [0, 1]."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Schedule(BaseModel):
    """A value that moves from ``start`` to ``end`` over training (``end`` unset = constant)."""

    model_config = ConfigDict(extra="forbid")
    start: float = Field(description="value at the start of training")
    end: float | None = Field(None, description="value at the end; None keeps start")
    kind: Literal["constant", "linear", "cosine"] = Field("constant", description="shape of the change")

    @model_validator(mode="before")
    @classmethod
    def _number_is_constant(cls, v: Any) -> Any:
        # a plain number (``--set train.loss.temperature=2``, YAML ``alpha: 0.5``) is a constant schedule
        return {"start": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    def at(self, t: float) -> float:
        if self.end is None or self.kind == "constant":
            return self.start
        t = min(max(t, 0.0), 1.0)
        if self.kind == "linear":
            w = t
        else:
            w = 0.5 * (1 - math.cos(math.pi * t))
        return self.start + (self.end - self.start) * w


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Learning-rate multiplier: linear warmup, then cosine, linear or constant decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - t)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
