"""ONNX export, checks, simplification and parity against PyTorch."""
