"""Latency measurement: runners (ONNX Runtime, torch, TensorRT), interleaved timing, statistics."""
