"""kdtoolkit: distill, quantize, export, build and profile PyTorch models for a target device.

Importing the package is cheap: torch, onnx and onnxruntime load only when a stage uses them.
"""

__version__ = "0.1.0"

from kdtoolkit.errors import KdtError  # noqa: E402

__all__ = ["__version__", "KdtError"]
