"""Runners own a loaded model and run one batch; ``measure`` times several of them interleaved.

Interleaving (a random order of candidates in every round, in one process) is what makes ratios
hold on a shared, noisy machine: every candidate sees the same background load.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kdtoolkit.errors import InputError
from kdtoolkit.profile.stats import summarize


class Runner(Protocol):
    name: str
    kind: str

    def input_shape(self) -> tuple[int, ...]: ...

    def run(self, x: np.ndarray) -> Any: ...

    def close(self) -> None: ...


class OrtRunner:
    """An ONNX Runtime session with intra-op spinning off (see kdtoolkit.engine.ort)."""

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None, threads: int = 0, providers: list[str] | None = None) -> None:
        from kdtoolkit.engine.ort import make_session

        self.path = Path(path)
        self.name = name or self.path.stem
        self.session = make_session(path, threads=threads, providers=providers, spinning=False)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self._shape = tuple(inp.shape)
        self.threads = threads
        self.providers = self.session.get_providers()

    def input_shape(self) -> tuple[Any, ...]:
        return self._shape

    def allowed_batch(self, batch: int) -> bool:
        b = self._shape[0]
        return not isinstance(b, int) or b == batch

    def run(self, x: np.ndarray) -> Any:
        return self.session.run(None, {self.input_name: x})

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> OrtRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TorchRunner:
    """Eager torch (or torch.compile'd) inference."""

    kind = "torch"

    def __init__(self, module: Any, *, name: str = "torch", shape: tuple[int, ...] | None = None, compile: bool = False) -> None:
        import torch

        self.name = name
        self.module = module.eval() if hasattr(module, "eval") else module
        if compile:
            self.module = torch.compile(self.module)
        self._shape = shape or ("batch", 3, 32, 32)

    def input_shape(self) -> tuple[Any, ...]:
        return self._shape

    def allowed_batch(self, batch: int) -> bool:
        return True

    def run(self, x: np.ndarray) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(x))

    def close(self) -> None:
        self.module = None

    def __enter__(self) -> TorchRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def realistic_input(shape: tuple[Any, ...], batch: int, seed: int = 0) -> np.ndarray:
    """Normalised-image-like input (not zeros: random weights and zeros can hit denormals or shortcuts)."""
    dims = [batch] + [int(d) if isinstance(d, int) else 1 for d in shape[1:]]
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


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
    when the budget for that batch size is spent (at least 5 rounds).
    """
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise InputError(f"runners need distinct names, got {names}")
    rng = random.Random(seed)
    out: dict[str, dict[int, dict[str, Any]]] = {r.name: {} for r in runners}
    for b in batches:
        for r in runners:
            if hasattr(r, "allowed_batch") and not r.allowed_batch(b):
                raise InputError(f"{r.name}: batch {b} is outside what the model accepts (input shape {r.input_shape()})")
        x = inputs[b] if inputs and b in inputs else realistic_input(runners[0].input_shape(), b, seed)
        for r in runners:
            for _ in range(warmup):
                r.run(x)
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
            s["samples_ms"] = [round(v, 5) for v in samples[r.name]]
            out[r.name][b] = s
    return out
