"""Latency measurement: interleaved timing of runners (kdtoolkit.backends), statistics, profile documents."""
