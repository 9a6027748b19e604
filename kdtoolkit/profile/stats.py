"""Summary statistics of latency samples (milliseconds)."""

from __future__ import annotations

from typing import Any

import numpy as np


def summarize(samples_ms: list[float] | np.ndarray, batch: int) -> dict[str, Any]:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50 = float(np.percentile(a, 50))
    return {
        "batch": int(batch),
        "n": int(a.size),
        "p50": p50,
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "throughput_per_s": float(batch * 1000.0 / p50) if p50 > 0 else float("inf"),
    }
