"""Runners own a loaded model and run one batch; ``measure`` times several of them interleaved.

Interleaving (a random order of candidates in every round, in one process) is what makes ratios
hold on a shared, noisy machine: every candidate sees the same background load.

``load_runner`` picks the runner from what it is given: an ONNX file, a TensorRT plan, a torch
checkpoint, or an artifact folder (onnx, torch or engine kind).
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from kdtoolkit.backends.base import _delta, realistic_input, rss_bytes
from kdtoolkit.errors import InputError
from kdtoolkit.latency.stats import summarize


def check_batches(runners: list[Any], batches: list[int]) -> None:
    """Fail before any timing when a batch is outside what a model accepts (a static batch axis, an engine profile)."""
    for b in batches:
        if b < 1:
            raise InputError(f"batch sizes must be >= 1, got {b}")
        for r in runners:
            if hasattr(r, "allowed_batch") and not r.allowed_batch(b):
                raise InputError(f"{r.name}: batch {b} is outside what the model accepts (input shape {list(r.input_shape())})")


def measure(
    runners: list[Any],
    batches: list[int],
    *,
    warmup: int = 10,
    iters: int = 100,
    time_budget_s: float | None = None,
    inputs: dict[int, np.ndarray] | None = None,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Time every runner at every batch, interleaved: each round runs each runner once, in random order.

    Returns ``{runner.name: {batch: summary + raw samples}}``. With ``time_budget_s`` the rounds stop
    when the budget for that batch size is spent (at least 5 rounds, at most ``iters`` if given
    explicitly > 0 alongside). ``mem_bytes`` is the RSS growth from loading plus warm-up (weights,
    ORT arena, workspaces), an upper-bound estimate since runners share one process.
    """
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise InputError(f"runners need distinct names, got {names}")
    check_batches(runners, batches)
    rng = random.Random(seed)
    out: dict[str, dict[int, dict[str, Any]]] = {r.name: {} for r in runners}
    warm_mem: dict[str, int | None] = {r.name: 0 for r in runners}
    for b in batches:
        x = inputs[b] if inputs and b in inputs else realistic_input(runners[0].input_shape(), b, seed)
        for r in runners:
            before = rss_bytes()
            for _ in range(warmup):
                r.run(x)
            if warmup == 0:
                r.run(x)
            d, acc = _delta(before, rss_bytes()), warm_mem[r.name]
            warm_mem[r.name] = None if d is None or acc is None else acc + d
        samples: dict[str, list[float]] = {r.name: [] for r in runners}
        start = time.perf_counter()
        i = 0
        order = list(runners)
        while True:
            rng.shuffle(order)
            for r in order:
                t0 = time.perf_counter()
                r.run(x)
                samples[r.name].append((time.perf_counter() - t0) * 1000.0)
            i += 1
            if progress is not None:
                progress(b, i)
            if time_budget_s is not None:
                if time.perf_counter() - start >= time_budget_s and i >= 5:
                    break
            elif i >= iters:
                break
        for r in runners:
            s = summarize(samples[r.name], b)
            load = getattr(r, "load_rss_bytes", None)
            s["mem_bytes"] = None if load is None or warm_mem[r.name] is None else load + warm_mem[r.name]
            s["samples_ms"] = [round(v, 5) for v in samples[r.name]]
            out[r.name][b] = s
    return out
