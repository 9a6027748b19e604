"""Backends: one runner protocol (base), ONNX Runtime (ort), torch (pytorch), TensorRT (trt/), the
runner factory above them, the static TensorRT check and the on-device report. See docs/architecture.md."""
