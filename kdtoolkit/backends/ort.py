"""ONNX Runtime sessions with the settings that make timing honest.

``session.intra_op.allow_spinning = 0``: measured here, idle spinning threads of other sessions
in the same process steal the cores and made the same model read 5 to 15 ms from run to run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.backends.base import _delta, rss_bytes
from kdtoolkit.errors import InputError

_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL", "none": "ORT_DISABLE_ALL"}


def session_options(*, threads: int = 0, inter_threads: int = 1, spinning: bool = False, level: str = "all", optimized_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = inter_threads
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def make_session(path: str | os.PathLike[str], *, threads: int = 0, providers: list[str] | None = None, spinning: bool = False, level: str = "all") -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            str(path), sess_options=session_options(threads=threads, spinning=spinning, level=level),
            providers=providers or ["CPUExecutionProvider"],
        )
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise InputError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None


def optimize_for_ort(src: str | os.PathLike[str], dst: str | os.PathLike[str], level: str = "extended") -> None:
    """Save ORT's offline-optimised graph. 'extended' fusions are portable across x86 CPUs; 'all' adds
    layout (NCHWc) transforms tied to the building CPU, which ORT applies again at load time anyway."""
    import onnxruntime as ort

    from kdtoolkit import fsutil

    with fsutil.atomic_path(dst, suffix=".onnx") as tmp:
        so = session_options(level=level, optimized_path=str(tmp))
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])


class OrtRunner:
    """An ONNX Runtime session with intra-op spinning off (see make_session above).

    ``providers`` may name CUDA / TensorRT execution providers; those not installed are dropped
    (with the CPU provider as the last resort) and ``self.providers`` says what really runs."""

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None, threads: int = 0,
                 providers: list[str] | None = None) -> None:
        import onnxruntime  # noqa: F401  (its import is not the model's memory)

        self.path = Path(path)
        self.name = name or self.path.stem
        before = rss_bytes()
        self.session = make_session(path, threads=threads, providers=_available_providers(providers), spinning=False)
        self.load_rss_bytes = _delta(before, rss_bytes())
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self._shape = tuple(inp.shape)
        self.threads = threads
        self.providers = self.session.get_providers()

    def describe(self) -> dict[str, Any]:
        return {"runner": self.kind, "path": str(self.path), "providers": self.providers, "intra_op_threads": self.threads,
                "allow_spinning": False, "input_shape": [d if isinstance(d, int) else str(d) for d in self._shape]}

    def input_shape(self) -> tuple[Any, ...]:
        return self._shape

    def allowed_batch(self, batch: int) -> bool:
        b = self._shape[0]
        return not isinstance(b, int) or b == batch

    def run(self, x: np.ndarray) -> Any:
        return self.session.run(None, {self.input_name: x})

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> OrtRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _available_providers(wanted: list[str] | None) -> list[str]:
    if not wanted:
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    keep = [p for p in wanted if p in avail]
    return keep + (["CPUExecutionProvider"] if "CPUExecutionProvider" not in keep else [])
