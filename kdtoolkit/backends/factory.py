"""``load_runner``: the runner for an ONNX file, TensorRT plan, torch checkpoint or artifact folder.

It sits above every backend (it imports them lazily); the backends import only ``backends.base``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError, MissingDependency

_TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ckpt", ".bin")


_ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def tensorrt_runner(path: Path, *, name: str) -> Any:
    """An open TensorRT runner for a plan (kdtoolkit.backends.trt.runner; TensorRT is imported only now)."""
    try:
        from kdtoolkit.backends.trt.runner import TrtRunner
    except ImportError as exc:
        raise MissingDependency(f"{path}: a TensorRT engine needs TensorRT and a CUDA GPU to run ({exc}); "
                                "install kdtoolkit[tensorrt] on the device the engine was built for") from None
    return TrtRunner(path, name=name).open()


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
    from kdtoolkit.bundle.common import unpacked_bundle

    path = unpacked_bundle(path) or path  # a bundle archive: timed as the folder it unpacks to
    if path.is_dir():
        from kdtoolkit.artifact import Artifact
        from kdtoolkit.bundle.common import bundle_manifest, bundle_model_file

        bundle = bundle_manifest(path)
        if bundle is not None:  # a shipped bundle: the model it serves (its ONNX where TensorRT cannot run)
            import importlib.util

            spec = importlib.util.find_spec("tensorrt")
            engines = spec is not None and spec.origin is not None  # tensorrt-stubs alone is a namespace with no origin
            return load_runner(bundle_model_file(path, bundle, engines=engines), name=label, threads=threads, providers=providers)

        art = Artifact.load(path)
        if art.kind == "onnx":
            from kdtoolkit.backends.ort import OrtRunner

            return OrtRunner(art.file("model.onnx") if "model.onnx" in art.manifest.files else art.first_file(".onnx"),
                             name=label, threads=threads, providers=providers)
        if art.kind == "engine":
            plan = next((path / f for f in art.manifest.files if f.endswith(_ENGINE_SUFFIXES)), None)
            if plan is None:
                raise InputError(f"{path}: engine artifact holds no .engine/.plan file (has: {', '.join(art.manifest.files)})")
            return tensorrt_runner(plan, name=label)
        if art.kind == "torch":
            from kdtoolkit.backends.pytorch import _torch_runner

            return _torch_runner(path, label, arch, trust_pickle, compile, threads, input_shape, art.info.get("model", {}))
        raise InputError(f"{path} is a {art.kind} artifact; profile needs an onnx, torch or engine artifact (or a model file)")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from kdtoolkit.backends.ort import OrtRunner

        return OrtRunner(path, name=label, threads=threads, providers=providers)
    if suffix in _ENGINE_SUFFIXES:
        return tensorrt_runner(path, name=label)
    if suffix in _TORCH_SUFFIXES:
        from kdtoolkit.backends.pytorch import _torch_runner

        return _torch_runner(path, label, arch, trust_pickle, compile, threads, input_shape, None)
    raise InputError(f"{path}: unknown model type {suffix or '(no suffix)'!r}; expected .onnx, "
                     f"{'/'.join(_ENGINE_SUFFIXES)}, {'/'.join(_TORCH_SUFFIXES)} or an artifact folder")
