"""The runner protocol every backend implements, and the memory helpers the runners share.

A runner owns a loaded model (ONNX Runtime session, torch module, TensorRT engine) and runs one batch;
it is a context manager whose ``close`` frees what it holds. ``kdtoolkit.latency`` times runners
interleaved; ``kdtoolkit.backends.factory.load_runner`` picks one for a file or artifact.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np


class Runner(Protocol):
    """What every runner offers (OrtRunner, TorchRunner, TrtRunner); ``load_rss_bytes`` may be None."""

    name: str
    kind: str  # "onnxruntime", "torch" or "tensorrt"
    load_rss_bytes: int | None

    def input_shape(self) -> tuple[Any, ...]:
        """The input shape, batch axis first (a name or -1 where dynamic)."""
        ...

    def allowed_batch(self, batch: int) -> bool:
        """Whether the model accepts this batch size (a static batch axis, an engine's profile)."""
        ...

    def run(self, x: np.ndarray) -> Any:
        """Run one batch; the raw outputs of the backend."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings that decide the timing (threads, providers, compile, profile), for the profile document."""
        ...

    def close(self) -> None:
        """Free what the runner holds; safe to call twice."""
        ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: Any) -> None: ...


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc; None elsewhere).

    No psutil needed; RSS deltas around loading and warm-up catch weights, the ORT CPU arena and
    torch's caching allocator alike, which tracemalloc (Python objects only) would miss."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """Peak RSS of this process so far (ru_maxrss; kB on Linux)."""
    try:
        import resource
        import sys

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(v if sys.platform == "darwin" else v * 1024)
    except (ImportError, OSError):
        return None


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else max(0, after - before)


def realistic_input(shape: tuple[Any, ...], batch: int, seed: int = 0) -> np.ndarray:
    """Normalised-image-like input (not zeros: random weights and zeros can hit denormals or shortcuts)."""
    dims = [batch] + [int(d) if isinstance(d, int) else 1 for d in shape[1:]]
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
