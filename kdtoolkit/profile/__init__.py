"""Moved: kdtoolkit.latency (timing, statistics) and kdtoolkit.backends (runners). Alias kept only until
benchmarks/int8_vs_ort.py imports the new names."""
