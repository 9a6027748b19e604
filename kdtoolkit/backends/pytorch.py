"""The torch runner: eager, or ``torch.compile``'d where it works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.backends.base import _delta, realistic_input, rss_bytes
from kdtoolkit.errors import InputError


class TorchRunner:
    """Eager torch, or ``torch.compile``'d where it works (falls back to eager, and says so)."""

    kind = "torch"

    def __init__(self, module: Any, *, name: str = "torch", shape: tuple[Any, ...] | None = None, compile: bool = False,
                 threads: int = 0) -> None:
        import torch

        self.name = name
        if threads:
            torch.set_num_threads(threads)
        self.module = module.eval() if hasattr(module, "eval") else module
        self.compiled = False
        self.compile_error: str | None = None
        self._shape = shape or ("batch", 3, 32, 32)
        if compile:
            try:
                cm = torch.compile(self.module)
                with torch.inference_mode():
                    cm(torch.from_numpy(realistic_input(self._shape, 1)))  # compile now, not inside the timed loop
                self.module, self.compiled = cm, True
            except Exception as exc:  # inductor needs a C compiler; many setups lack one
                self.compile_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        self.load_rss_bytes: int | None = None

    def describe(self) -> dict[str, Any]:
        import torch

        return {"runner": self.kind, "compiled": self.compiled, "compile_error": self.compile_error,
                "torch_threads": torch.get_num_threads(), "input_shape": [d if isinstance(d, int) else str(d) for d in self._shape]}

    def input_shape(self) -> tuple[Any, ...]:
        return self._shape

    def allowed_batch(self, batch: int) -> bool:
        return True

    def run(self, x: np.ndarray) -> Any:
        import torch

        with torch.inference_mode():
            return self.module(torch.from_numpy(x))

    def close(self) -> None:
        self.module = None

    def __enter__(self) -> TorchRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _torch_shape(meta: dict[str, Any], given: tuple[int, ...] | None) -> tuple[Any, ...] | None:
    if given:
        return ("batch", *given[1:]) if len(given) == 4 else ("batch", *given)
    from kdtoolkit.data.inputspec import InputSpec

    shape = InputSpec.from_meta(meta).shape
    return ("batch", *shape) if shape else None


def _torch_runner(path: Path, label: str, arch: str | None, trust_pickle: bool, compile: bool, threads: int,
                  input_shape: tuple[int, ...] | None, meta: dict[str, Any] | None) -> TorchRunner:
    import torch  # noqa: F401  (the library's own memory is not the model's)

    from kdtoolkit.models.loading import load_model

    before = rss_bytes()
    loaded = load_model(path, arch=arch, trust_pickle=trust_pickle)
    shape = _torch_shape({**(meta or {}), **loaded.meta}, input_shape)
    if shape is None:
        raise InputError(f"{path}: the model carries no input size; pass --input-shape C,H,W")
    r = TorchRunner(loaded.module, name=label, shape=shape, compile=compile, threads=threads)
    r.load_rss_bytes = _delta(before, rss_bytes())
    return r
