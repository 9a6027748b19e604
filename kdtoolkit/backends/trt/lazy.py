"""The lazy ``tensorrt`` handle and what every TensorRT module shares (below the builder and the runner).

``tensorrt`` is imported on first use, never at ``import kdtoolkit``; a missing install is a
MissingDependency (exit 3) that says what to install. For type checking, modules import the real
``tensorrt`` (NVIDIA's stubs) under TYPE_CHECKING.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdtoolkit.errors import MissingDependency, lazy_import

if TYPE_CHECKING:
    import tensorrt as trt


INSTALL_HINT = (
    "install it on the machine with the target GPU: pip install 'kdtoolkit[tensorrt]' (x86, or JetPack's own python3-libnvinfer "
    "on Jetson), or use the docker images docker/tensorrt-x86.Dockerfile (x86 GPU) and docker/jetson-l4t.Dockerfile "
    "(Jetson); `kdtoolkit check` runs without TensorRT"
)


PLAN_NAME = "model.plan"


def load_tensorrt() -> Any:
    """Import TensorRT or raise MissingDependency (exit 3) that says exactly what to install."""
    try:
        mod = lazy_import("tensorrt", extra="tensorrt", purpose="building and running TensorRT engines")
    except MissingDependency as exc:
        raise MissingDependency(f"TensorRT is not installed ({exc.__cause__}); {INSTALL_HINT}") from None
    if not hasattr(mod, "Builder"):  # tensorrt-stubs alone leave an empty `tensorrt` namespace package
        raise MissingDependency(f"TensorRT is not installed (only type stubs were found for 'tensorrt'); {INSTALL_HINT}")
    return mod


class _LazyTensorRT:
    """Stands in for the ``tensorrt`` module at run time, importing it on first attribute use."""

    def __getattr__(self, name: str) -> Any:
        return getattr(load_tensorrt(), name)


if not TYPE_CHECKING:
    trt = _LazyTensorRT()


def installed_version() -> str:
    return str(load_tensorrt().__version__)
