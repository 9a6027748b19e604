"""Runtimes: ONNX Runtime sessions, the TensorRT builder and runner, the static check."""
