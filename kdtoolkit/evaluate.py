"""One evaluation used everywhere: top-1 accuracy and agreement with a reference (the teacher),
on a torch module and on an ONNX Runtime session alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from kdtoolkit.data.datasets import ArrayData, DataSpec, to_tensor

Predictor = Callable[[np.ndarray], np.ndarray]


def flatten_outputs(out: Any) -> list[Any]:
    """A model's outputs as a list in output order: one tensor, a dict's values, a tuple's items."""
    if isinstance(out, dict):
        return [v for v in out.values()]
    if isinstance(out, (list, tuple)):
        return [v for o in out for v in flatten_outputs(o)]
    return [out]


def as_predictor(model: Any, *, all_outputs: bool = False) -> Predictor:
    """Wrap a torch module, an ORT session or an .onnx path as ``f(float32 NCHW) -> logits``
    (``all_outputs``: ``-> [every output]``, for models whose outputs are not class logits)."""
    if callable(model) and getattr(model, "_kdt_predictor", False) and getattr(model, "_kdt_all", False) == all_outputs:
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

        def run_ort(x: np.ndarray) -> Any:
            outs = sess.run(None, {name: x.astype(np.float32, copy=False)})
            return outs if all_outputs else outs[0]

        run_ort._kdt_predictor = True  # type: ignore[attr-defined]
        run_ort._kdt_all = all_outputs  # type: ignore[attr-defined]
        return run_ort
    import torch

    module = model
    if isinstance(module, torch.nn.Module):
        module.eval()

    def run_torch(x: np.ndarray) -> Any:
        with torch.inference_mode():
            out = module(torch.from_numpy(x))
            if all_outputs:
                return [o.float().numpy() for o in flatten_outputs(out)]
            return out.float().numpy()

    run_torch._kdt_predictor = True  # type: ignore[attr-defined]
    run_torch._kdt_all = all_outputs  # type: ignore[attr-defined]
    return run_torch


def predict(model: Any, data: ArrayData, spec: DataSpec, batch_size: int = 256, *, all_outputs: bool = False) -> Any:
    """Logits for every sample of ``data`` (images normalised with ``spec``); with ``all_outputs``, the list of
    every output of the model (each concatenated over the batches)."""
    f = as_predictor(model, all_outputs=all_outputs)
    outs = []
    for i in range(0, len(data), batch_size):
        x = to_tensor(data.x[i:i + batch_size], spec).numpy()
        outs.append([np.asarray(o) for o in f(x)] if all_outputs else np.asarray(f(x)))
    if all_outputs:
        return [np.concatenate(per) for per in zip(*outs)] if outs else []
    return np.concatenate(outs) if outs else np.zeros((0, len(spec.classes)), np.float32)


def output_fidelity(ref: list[np.ndarray], got: list[np.ndarray], names: list[str]) -> dict[str, Any]:
    """How close ``got`` is to ``ref``, per output (for outputs that are not class logits, where top-1 means
    nothing): max and mean |diff|, and both relative to the reference output's range (max - min)."""
    out: dict[str, Any] = {}
    for name, r, g in zip(names, ref, got):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        d = np.abs(r - g) if r.size else np.zeros(1)
        span = float(r.max() - r.min()) if r.size else 0.0
        out[name] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "range": span,
                     "max_rel_to_range": float(d.max()) / span if span > 0 else None,
                     "mean_rel_to_range": float(d.mean()) / span if span > 0 else None}
    return out


def fidelity_text(fid: dict[str, Any]) -> str:
    """One line: per output, max and mean |diff| relative to the output's range."""
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f} %"

    return ", ".join(f"{n} max |diff| {f['max_abs_diff']:.3g} ({pct(f['max_rel_to_range'])} of range), mean "
                     f"{f['mean_abs_diff']:.3g} ({pct(f['mean_rel_to_range'])})" for n, f in fid.items())


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


def output_names(model: Any, x: np.ndarray) -> list[str] | None:
    """None when a torch model returns one tensor (logits); else a name per output: the dict's keys, output0.. for a tuple."""
    import torch

    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(x))
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return [str(k) for k in out]
    return [f"output{i}" for i in range(len(flatten_outputs(out)))]




def check_outputs(model: Any, spec: DataSpec, *, allow_raw: bool = False) -> list[str] | None:
    """Run one sample through the model; fail clearly if its output count differs from the class count.

    Returns None for class logits. A model whose outputs are not class logits (a dict, a tuple, a tensor that is
    not batch x classes) is refused unless ``allow_raw`` (``--no-student``: export, INT8, check, bundle without
    top-1); then the names of its outputs are returned."""
    from kdtoolkit.errors import InputError

    x = np.zeros((1, spec.channels, *spec.input_size), np.float32)
    kind = output_kind(model, x)
    why = "distillation and top-1 need class logits; give --no-student to export, quantize (INT8, calibrated), check and bundle it"
    if kind is not None:
        if allow_raw:
            return output_names(model, x)
        raise InputError(f"the model's output is not class logits ({kind}): {why}")
    try:
        out = np.asarray(as_predictor(model)(x))
    except Exception as exc:
        raise InputError(
            f"the model does not run on inputs of shape 1x{spec.channels}x{spec.input_size[0]}x{spec.input_size[1]}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if out.ndim != 2:
        if allow_raw:
            return ["output0"]
        raise InputError(f"the model's output is not class logits (shape {'x'.join(map(str, out.shape))}, expected batch x classes): "
                         f"{why}")
    if out.shape[-1] != len(spec.classes):
        raise InputError(f"the model has {out.shape[-1]} outputs but the data has {len(spec.classes)} classes ({', '.join(spec.classes[:5])}...)")
    return None
