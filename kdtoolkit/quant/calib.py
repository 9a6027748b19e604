"""Calibration helpers shared by PTQ and QAT (below both, so neither imports the other for them):
the seeded calibration sample and the MSE-optimal clipping range."""

from __future__ import annotations

from typing import Any

import numpy as np

from kdtoolkit.errors import InputError
from kdtoolkit.quant.schemes import Scheme

MIN_CALIB = 16  # fewer samples give ranges that are noise (and entropy/percentile need a histogram)


def calib_array(splits: Any, n: int, seed: int = 0) -> np.ndarray:
    """``n`` normalised samples drawn (seeded) from the training split."""
    from kdtoolkit.data.datasets import to_tensor

    have = len(splits.train)
    if n < MIN_CALIB:
        raise InputError(f"calibration needs at least {MIN_CALIB} samples, got --calib-size {n}")
    if have < n:
        raise InputError(f"calibration asked for {n} samples but the training split has only {have}; lower --calib-size")
    idx = np.sort(np.random.default_rng(seed).choice(have, n, replace=False))
    return to_tensor(splits.train.x[idx], splits.spec).numpy()


def qdq_error(values: np.ndarray, scheme: Scheme, rmin: float, rmax: float) -> float:
    """Mean squared quantize-dequantize error of ``values`` for one range (ORT's Q: round half to even)."""
    scale, zp = scheme.act_qparams(rmin, rmax)
    lo, hi = scheme.act_range
    q = np.clip(np.round(values / scale) + zp, lo, hi)
    return float(np.mean(((q - zp) * scale - values) ** 2))


def mse_range(values: np.ndarray, scheme: Scheme, steps: int = 60) -> tuple[float, float]:
    """The clipping range (a shrink of the observed range) with the smallest quantization MSE."""
    v = values.astype(np.float32, copy=False).ravel()
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    if hi - lo <= 0:
        return lo, hi
    best = (np.inf, lo, hi)
    for a in np.linspace(0.1, 1.0, steps):
        r = (lo * a, hi * a)
        e = qdq_error(v, scheme, *r)
        if e < best[0]:
            best = (e, *r)
    return float(best[1]), float(best[2])
