"""Moved to kdtoolkit.targets ("profile" alone meant too many things). Alias kept until tests/test_quant*.py
and benchmarks/int8_vs_ort.py import the new name."""

from kdtoolkit.targets import Profile, load_profile

__all__ = ["Profile", "load_profile"]
