"""Moved: runners to kdtoolkit.backends, ``measure`` to kdtoolkit.latency.timing (alias for benchmarks/int8_vs_ort.py)."""

from kdtoolkit.backends.ort import OrtRunner
from kdtoolkit.latency.timing import measure

__all__ = ["OrtRunner", "measure"]
