"""One evaluation used everywhere: top-1 accuracy and agreement with a reference (the teacher),
on a torch module and on an ONNX Runtime session alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kdtoolkit.data.datasets import ArrayData, DataSpec, to_tensor

Predictor = Callable[[np.ndarray], np.ndarray]


def as_predictor(model: Any) -> Predictor:
    """Wrap a torch module, an ORT session or an .onnx path as ``f(float32 NCHW) -> logits``."""
    if callable(model) and getattr(model, "_kdt_predictor", False):
        return model
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover
        ort = None
    if isinstance(model, str) and model.endswith(".onnx"):
        from kdtoolkit.backends.ort import make_session

        model = make_session(model)
    if ort is not None and isinstance(model, ort.InferenceSession):
        sess = model
        name = sess.get_inputs()[0].name

        def run_ort(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {name: x.astype(np.float32, copy=False)})[0]

        run_ort._kdt_predictor = True  # type: ignore[attr-defined]
        return run_ort
    import torch

    module = model
    if isinstance(module, torch.nn.Module):
        module.eval()

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    run_torch._kdt_predictor = True  # type: ignore[attr-defined]
    return run_torch


def predict(model: Any, data: ArrayData, spec: DataSpec, batch_size: int = 256) -> np.ndarray:
    """Logits for every sample of ``data`` (images normalised with ``spec``)."""
    f = as_predictor(model)
    outs = []
    for i in range(0, len(data), batch_size):
        x = to_tensor(data.x[i:i + batch_size], spec).numpy()
        outs.append(np.asarray(f(x)))
    return np.concatenate(outs) if outs else np.zeros((0, len(spec.classes)), np.float32)


def evaluate(
    model: Any,
    data: ArrayData,
    spec: DataSpec,
    *,
    batch_size: int = 256,
    reference: np.ndarray | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy (fraction) and, given reference logits or labels, top-1 agreement with them."""
    logits = predict(model, data, spec, batch_size)
    if logits.ndim != 2 or logits.shape[1] != len(spec.classes):
        from kdtoolkit.errors import InputError

        raise InputError(f"the model has {logits.shape[-1]} outputs but the data has {len(spec.classes)} classes")
    pred = logits.argmax(1)
    out: dict[str, Any] = {"accuracy": float((pred == data.y).mean()) if len(data) else 0.0, "n": int(len(data))}
    if reference is not None:
        ref = reference.argmax(1) if reference.ndim == 2 else reference
        out["agreement"] = float((pred == ref).mean())
    out["logits"] = logits
    return out


def output_kind(model: Any, x: np.ndarray) -> str | None:
    """None when a torch model returns one tensor; else a short description of what it returns (dict, tuple...)."""
    import torch

    if not isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        return None
    try:
        with torch.inference_mode():
            out = model.eval()(torch.from_numpy(x))
    except Exception:
        return None  # the caller reports the failure to run with the input shape
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, dict):
        return f"a dict with keys {', '.join(map(str, list(out)[:5]))}"
    if isinstance(out, (list, tuple)):
        return f"a {type(out).__name__} of {len(out)} items"
    return f"a {type(out).__name__}"


def check_outputs(model: Any, spec: DataSpec) -> int:
    """Run one sample through the model; fail clearly if its output count differs from the class count."""
    from kdtoolkit.errors import InputError

    x = np.zeros((1, spec.channels, *spec.input_size), np.float32)
    kind = output_kind(model, x)
    if kind is not None:
        raise InputError(f"the model's output is not class logits ({kind}): kdtoolkit distils and measures classifiers; "
                         "detectors and segmenters are not supported yet")
    try:
        out = np.asarray(as_predictor(model)(x))
    except Exception as exc:
        raise InputError(
            f"the model does not run on inputs of shape 1x{spec.channels}x{spec.input_size[0]}x{spec.input_size[1]}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if out.ndim != 2:
        raise InputError(f"the model's output is not class logits (shape {'x'.join(map(str, out.shape))}, expected batch x classes): "
                         "kdtoolkit distils and measures classifiers; detectors and segmenters are not supported yet")
    if out.shape[-1] != len(spec.classes):
        raise InputError(f"the model has {out.shape[-1]} outputs but the data has {len(spec.classes)} classes ({', '.join(spec.classes[:5])}...)")
    return int(out.shape[-1])
