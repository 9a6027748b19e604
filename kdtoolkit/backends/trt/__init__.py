"""TensorRT 8.5 .. 11: version rules, build configuration, calibrator, builder, runner and the on-device commands.

Nothing here imports ``tensorrt`` at import time (``lazy.load_tensorrt``)."""
