"""ONNX Runtime sessions with the settings that make timing honest.

``session.intra_op.allow_spinning = 0``: measured here, idle spinning threads of other sessions
in the same process steal the cores and made the same model read 5 to 15 ms from run to run.
"""

from __future__ import annotations

import os
from typing import Any

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


def session_for_profile(path: str | os.PathLike[str], profile: Any, *, spinning: bool = False) -> Any:
    o = profile.onnxruntime
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    providers = [p for p in o.execution_providers if p in avail] or ["CPUExecutionProvider"]
    return make_session(path, threads=o.intra_op_threads, providers=providers, spinning=spinning)


def optimize_for_ort(src: str | os.PathLike[str], dst: str | os.PathLike[str], level: str = "extended") -> None:
    """Save ORT's offline-optimised graph. 'extended' fusions are portable across x86 CPUs; 'all' adds
    layout (NCHWc) transforms tied to the building CPU, which ORT applies again at load time anyway."""
    import onnxruntime as ort

    from kdtoolkit import fsutil

    with fsutil.atomic_path(dst, suffix=".onnx") as tmp:
        so = session_options(level=level, optimized_path=str(tmp))
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
