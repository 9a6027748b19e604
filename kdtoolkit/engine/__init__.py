"""Moved: kdtoolkit.backends (ONNX Runtime, TensorRT, the static check). This alias package stays only
until kdtoolkit/quant and its tests import the new names (they were being edited concurrently)."""
