"""Runners own a loaded model and run one batch; ``measure`` times several of them interleaved.

Interleaving (a random order of candidates in every round, in one process) is what makes ratios
hold on a shared, noisy machine: every candidate sees the same background load.

``load_runner`` picks the runner from what it is given: an ONNX file, a TensorRT plan, a torch
checkpoint, or an artifact folder (onnx, torch or engine kind).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kdtoolkit.errors import InputError, MissingDependency
from kdtoolkit.profile.stats import summarize


class Runner(Protocol):
    name: str
    kind: str

    def input_shape(self) -> tuple[Any, ...]: ...

    def run(self, x: np.ndarray) -> Any: ...

    def close(self) -> None: ...


# --- memory -------------------------------------------------------------------------------------

def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc; None elsewhere).

    No psutil needed; RSS deltas around loading and warm-up catch weights, the ORT CPU arena and
    torch's caching allocator alike, which tracemalloc (Python objects only) would miss."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """Peak RSS of this process so far (ru_maxrss; kB on Linux)."""
    try:
        import resource
        import sys

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(v if sys.platform == "darwin" else v * 1024)
    except (ImportError, OSError):
        return None


def _delta(before: int | None, after: int | None) -> int | None:
    return None if before is None or after is None else max(0, after - before)


# --- runners ------------------------------------------------------------------------------------

class OrtRunner:
    """An ONNX Runtime session with intra-op spinning off (see kdtoolkit.engine.ort).

    ``providers`` may name CUDA / TensorRT execution providers; those not installed are dropped
    (with the CPU provider as the last resort) and ``self.providers`` says what really runs."""

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None, threads: int = 0,
                 providers: list[str] | None = None) -> None:
        import onnxruntime  # noqa: F401  (its import is not the model's memory)

        from kdtoolkit.engine.ort import make_session

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


class TrtAdapter:
    """Gives kdtoolkit.engine.tensorrt.TrtRunner (another module's context manager) the runner interface."""

    kind = "tensorrt"

    def __init__(self, inner: Any, name: str) -> None:
        self.inner, self.name = inner, name
        inner.__enter__()
        spec = inner.inputs[0]
        self._profile = spec.get("profile") or {}
        self._shape = tuple(self._profile.get("opt") or spec.get("shape") or ())
        self.load_rss_bytes: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"runner": self.kind, "path": str(getattr(self.inner, "plan_path", "")), "profile": self._profile}

    def input_shape(self) -> tuple[Any, ...]:
        return self._shape

    def allowed_batch(self, batch: int) -> bool:
        mn, mx = self._profile.get("min"), self._profile.get("max")
        return not (mn and mx) or mn[0] <= batch <= mx[0]

    def run(self, x: np.ndarray) -> Any:
        return self.inner.run(x)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.__exit__(None, None, None)
            self.inner = None


def tensorrt_runner(path: Path, *, name: str) -> TrtAdapter:
    """The TensorRT plan runner lives in kdtoolkit.engine.tensorrt (imported only when an engine is profiled)."""
    import importlib

    try:
        mod = importlib.import_module("kdtoolkit.engine.tensorrt")
    except ImportError as exc:
        raise MissingDependency(f"{path}: a TensorRT engine needs TensorRT and a CUDA GPU to run ({exc}); "
                                "install kdtoolkit[tensorrt] on the device the engine was built for") from None
    cls = getattr(mod, "TrtRunner", None)
    if cls is None:
        raise MissingDependency(f"{path}: this kdtoolkit has no TensorRT runner (kdtoolkit.engine.tensorrt.TrtRunner missing)")
    return TrtAdapter(cls(path, name=name), name)


# --- choosing a runner --------------------------------------------------------------------------

_TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ckpt", ".bin")
_ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _torch_shape(meta: dict[str, Any], given: tuple[int, ...] | None) -> tuple[Any, ...] | None:
    if given:
        return ("batch", *given[1:]) if len(given) == 4 else ("batch", *given)
    from kdtoolkit.data.inputspec import InputSpec

    shape = InputSpec.from_meta(meta).shape
    return ("batch", *shape) if shape else None


def load_runner(
    spec: str | os.PathLike[str],
    *,
    name: str | None = None,
    threads: int = 0,
    providers: list[str] | None = None,
    compile: bool = False,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> Any:
    """A runner for an ONNX file, TensorRT plan, torch checkpoint or artifact folder.

    ``input_shape`` (C,H,W or N,C,H,W) is needed only for a torch file that carries no input
    metadata; ONNX and engines know their own shapes."""
    path = Path(spec)
    if not path.exists():
        raise InputError(f"model not found: {path}")
    label = name or (path.name if path.is_dir() else path.stem)
    if path.is_dir():
        from kdtoolkit.artifact import Artifact

        art = Artifact.load(path)
        if art.kind == "onnx":
            return OrtRunner(art.file("model.onnx") if "model.onnx" in art.manifest.files else art.first_file(".onnx"),
                             name=label, threads=threads, providers=providers)
        if art.kind == "engine":
            plan = next((path / f for f in art.manifest.files if f.endswith(_ENGINE_SUFFIXES)), None)
            if plan is None:
                raise InputError(f"{path}: engine artifact holds no .engine/.plan file (has: {', '.join(art.manifest.files)})")
            return tensorrt_runner(plan, name=label)
        if art.kind == "torch":
            return _torch_runner(path, label, arch, trust_pickle, compile, threads, input_shape, art.info.get("model", {}))
        raise InputError(f"{path} is a {art.kind} artifact; profile needs an onnx, torch or engine artifact (or a model file)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OrtRunner(path, name=label, threads=threads, providers=providers)
    if suffix in _ENGINE_SUFFIXES:
        return tensorrt_runner(path, name=label)
    if suffix in _TORCH_SUFFIXES:
        return _torch_runner(path, label, arch, trust_pickle, compile, threads, input_shape, None)
    raise InputError(f"{path}: unknown model type {suffix or '(no suffix)'!r}; expected .onnx, "
                     f"{'/'.join(_ENGINE_SUFFIXES)}, {'/'.join(_TORCH_SUFFIXES)} or an artifact folder")


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


# --- timing -------------------------------------------------------------------------------------

def realistic_input(shape: tuple[Any, ...], batch: int, seed: int = 0) -> np.ndarray:
    """Normalised-image-like input (not zeros: random weights and zeros can hit denormals or shortcuts)."""
    dims = [batch] + [int(d) if isinstance(d, int) else 1 for d in shape[1:]]
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def check_batches(runners: list[Any], batches: list[int]) -> None:
    """Fail before any timing when a batch is outside what a model accepts (a static batch axis, an engine profile)."""
    for b in batches:
        if b < 1:
            raise InputError(f"batch sizes must be >= 1, got {b}")
        for r in runners:
            if hasattr(r, "allowed_batch") and not r.allowed_batch(b):
                raise InputError(f"{r.name}: batch {b} is outside what the model accepts (input shape {list(r.input_shape())})")


def measure(
    runners: list[Any],
    batches: list[int],
    *,
    warmup: int = 10,
    iters: int = 100,
    time_budget_s: float | None = None,
    inputs: dict[int, np.ndarray] | None = None,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, dict[int, dict[str, Any]]]:
    """Time every runner at every batch, interleaved: each round runs each runner once, in random order.

    Returns ``{runner.name: {batch: summary + raw samples}}``. With ``time_budget_s`` the rounds stop
    when the budget for that batch size is spent (at least 5 rounds, at most ``iters`` if given
    explicitly > 0 alongside). ``mem_bytes`` is the RSS growth from loading plus warm-up (weights,
    ORT arena, workspaces), an upper-bound estimate since runners share one process.
    """
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise InputError(f"runners need distinct names, got {names}")
    check_batches(runners, batches)
    rng = random.Random(seed)
    out: dict[str, dict[int, dict[str, Any]]] = {r.name: {} for r in runners}
    warm_mem: dict[str, int | None] = {r.name: 0 for r in runners}
    for b in batches:
        x = inputs[b] if inputs and b in inputs else realistic_input(runners[0].input_shape(), b, seed)
        for r in runners:
            before = rss_bytes()
            for _ in range(warmup):
                r.run(x)
            if warmup == 0:
                r.run(x)
            d, acc = _delta(before, rss_bytes()), warm_mem[r.name]
            warm_mem[r.name] = None if d is None or acc is None else acc + d
        samples: dict[str, list[float]] = {r.name: [] for r in runners}
        start = time.perf_counter()
        i = 0
        order = list(runners)
        while True:
            rng.shuffle(order)
            for r in order:
                t0 = time.perf_counter()
                r.run(x)
                samples[r.name].append((time.perf_counter() - t0) * 1000.0)
            i += 1
            if progress is not None:
                progress(b, i)
            if time_budget_s is not None:
                if time.perf_counter() - start >= time_budget_s and i >= 5:
                    break
            elif i >= iters:
                break
        for r in runners:
            s = summarize(samples[r.name], b)
            load = getattr(r, "load_rss_bytes", None)
            s["mem_bytes"] = None if load is None or warm_mem[r.name] is None else load + warm_mem[r.name]
            s["samples_ms"] = [round(v, 5) for v in samples[r.name]]
            out[r.name][b] = s
    return out
