"""Quantization-aware training under distillation, with fake-quant that IS the exported scheme.

* BatchNorm is folded into the conv weights first (``torch.fx`` conv+bn fusion in eval mode), so
  the weights that get fake-quantized are the weights the runtime multiplies.
* Fake-quant sits where the QDQ graph has Q/DQ: on every tensor that feeds a Conv/Linear, a
  residual Add or a pooling op, and on the output of a Linear, an Add or an average pool (one quantizer
  per tensor, shared by all its consumers); ops that only move values (flatten, view, max pool) reuse their
  input's quantizer on their output. That is the placement onnxruntime's own quantizer uses, so ORT fuses the
  same kernels (checked against quantize_static's optimised graph in tests/test_quant_ort.py); and on
  Conv/Linear weights per output channel (axis 0), symmetric, zero point 0.
* The numbers are the runtime's: activation (scale, zero point) from the scheme's
  ``act_qparams`` (ORT's ``compute_scale_zp``), weight scale = absmax / 127 (or / 64 with
  reduce_range), clamping to the dtype range, round half to even (``torch.fake_quantize_*`` and
  ONNX QuantizeLinear both use it). Activation scales start from calibration on the training split
  and are then trained (LSQ gradient) or kept fixed; zero points stay as calibrated.
* Training is the project's one loop (:class:`kdtoolkit.distill.trainer.Trainer`) with the KD loss
  from the teacher; the result is exported with the legacy exporter, whose fake-quant ops become
  QuantizeLinear/DequantizeLinear, then weight Q nodes are folded into int8 initializers (what
  onnxruntime's quantizer writes), so ORT sees DQ(int8 weight) -> Conv.
"""

from __future__ import annotations

import copy
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.config import QatConfig  # noqa: F401  (re-exported: QAT callers import it from here)
from kdtoolkit.errors import InputError
from kdtoolkit.quant.schemes import Scheme


def _torch():
    import torch

    return torch


def _make_modules():
    torch = _torch()
    from torch import nn

    class ActFakeQuant(nn.Module):
        """Per-tensor fake-quant of an activation; observes ranges first when ``observing``."""

        def __init__(self, qmin: int, qmax: int) -> None:
            super().__init__()
            self.qmin, self.qmax = qmin, qmax
            self.scale = nn.Parameter(torch.ones(1))
            self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
            self.observing = False
            self.learn = True
            self.samples: list[Any] = []

        def forward(self, x):
            if self.observing:
                v = x.detach().flatten()
                k = min(v.numel(), 1 << 16)
                idx = torch.randint(v.numel(), (k,))
                self.samples.append(torch.cat([v[idx], v.min()[None], v.max()[None]]).numpy())
                return x
            if self.training and self.learn:
                g = 1.0 / float(np.sqrt(max(x[0].numel(), 1) * max(self.qmax, 1)))  # LSQ gradient scale
                return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point.float(), self.qmin, self.qmax, g)
            return torch.fake_quantize_per_tensor_affine(x, self.scale.detach(), self.zero_point, self.qmin, self.qmax)

    class WeightFakeQuant(nn.Module):
        """Wrap a Conv2d/Linear: its weight fake-quantized per output channel (symmetric, zp 0)."""

        def __init__(self, mod: nn.Module, qmax_w: int) -> None:
            super().__init__()
            self.mod = mod
            self.qmax_w = qmax_w

        def weight_scale(self):
            w = self.mod.weight.detach()
            absmax = w.abs().flatten(1).amax(1)
            # float32 of 2*absmax/(qmax-qmin): what onnxruntime's compute_scale_zp stores
            s = (absmax.double() / self.qmax_w).float()
            return torch.where(absmax < torch.finfo(torch.float32).tiny, torch.ones_like(s), s)

        def freeze(self) -> None:
            """Store the scale as a buffer so the export holds constants, not the absmax computation."""
            s = self.weight_scale()
            self.register_buffer("frozen_scale", s, persistent=False)
            self.register_buffer("frozen_zp", torch.zeros(s.shape, dtype=torch.int32), persistent=False)

        def forward(self, x):
            if torch.onnx.is_in_onnx_export():
                s, zp = self.frozen_scale, self.frozen_zp
            else:
                s = self.weight_scale()
                zp = torch.zeros(s.shape, dtype=torch.int32)
            # clamp bounds of the int8 dtype: |w / s| <= qmax_w already, so this equals ORT's [-qmax_w, qmax_w]
            w = torch.fake_quantize_per_channel_affine(self.mod.weight, s, zp, 0, -128, 127)
            if isinstance(self.mod, nn.Linear):
                return torch.nn.functional.linear(x, w, self.mod.bias)
            m = self.mod
            if m.padding_mode != "zeros":
                raise InputError(f"QAT supports zero-padded convs only, got padding_mode={m.padding_mode!r}")
            return torch.nn.functional.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)

    return ActFakeQuant, WeightFakeQuant


def fold_bn(model: Any) -> Any:
    """An FX GraphModule of ``model`` with every Conv->BatchNorm folded into the conv (eval statistics)."""
    _torch()  # torch is needed (a one-line error without it)
    import inspect

    from torch import fx
    from torch.fx.experimental.optimization import fuse

    m = copy.deepcopy(model).eval()
    try:
        # optional forward arguments (timm ViT's attn_mask / is_causal) are fixed at their defaults: traced as inputs they
        # would reach the ONNX export as tensors, where scaled_dot_product_attention needs a Python bool
        gm = fx.symbolic_trace(m)
        defaults = {p.name: p.default for p in list(inspect.signature(m.forward).parameters.values())[1:]
                    if p.default is not inspect.Parameter.empty}
        for node in [n for n in gm.graph.nodes if n.op == "placeholder" and n.target in defaults]:
            node.replace_all_uses_with(defaults[node.target])  # type: ignore[arg-type]
            gm.graph.erase_node(node)
        gm.recompile()
        return fuse(gm, inplace=True, no_trace=True)
    except Exception as exc:
        raise InputError(f"QAT needs a model torch.fx can trace ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); use PTQ instead") from None


def prepare_qat(model: Any, scheme: Scheme) -> Any:
    """BN-folded FX graph with fake-quant at the scheme's Q/DQ positions (see module docstring)."""
    torch = _torch()
    from torch import nn

    ActFakeQuant, WeightFakeQuant = _make_modules()
    gm = fold_bn(model)
    mods = dict(gm.named_modules())
    qmin, qmax = scheme.act_range
    graph = gm.graph
    fq_of: dict[Any, Any] = {}
    count = 0

    def quantize_input(user, arg) -> None:
        nonlocal count
        if not isinstance(arg, torch.fx.Node) or quantized_copy(arg) is arg:
            return
        if arg not in fq_of:
            name = f"act_fq_{count}"
            count += 1
            gm.add_submodule(name, ActFakeQuant(qmin, qmax))
            with graph.inserting_after(arg):
                fq_of[arg] = graph.call_module(name, (arg,))
        user.replace_input_with(arg, fq_of[arg])

    def quantize_output(node) -> None:
        nonlocal count
        users = list(node.users)
        name = f"act_fq_{count}"
        count += 1
        gm.add_submodule(name, ActFakeQuant(qmin, qmax))
        with graph.inserting_after(node):
            fq = graph.call_module(name, (node,))
        for u in users:
            u.replace_input_with(node, fq)
        fq_of[node] = fq

    adds = (operator.add, operator.iadd, torch.add)
    F = torch.nn.functional
    pools_f = (F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.nn.functional.adaptive_max_pool2d)
    pools_m = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
    for node in list(graph.nodes):  # identities would split one tensor into two quantizers
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    def quantized_copy(arg):
        """The fake-quant node that carries ``arg`` (``arg`` itself when it is one), or None."""
        if not isinstance(arg, torch.fx.Node):
            return None
        if arg.op == "call_module" and isinstance(gm.get_submodule(str(arg.target)), ActFakeQuant):
            return arg
        return fq_of.get(arg)

    def share_quantizer(node) -> None:
        """``node`` only moves values (flatten, view, max pool): it reads the quantized copy of its input and its
        output gets the SAME quantizer (scale, zero point), as ORT's quantizer does for these ops, so ORT drops
        the equal Q/DQ pair around it and runs it on uint8 between two fused kernels."""
        src = node.args[0]
        fq_in = quantized_copy(src)
        if fq_in is not src:
            node.replace_input_with(src, fq_in)
        users = list(node.users)
        with graph.inserting_after(node):
            fq = graph.call_module(fq_in.target, (node,))
        for u in users:
            u.replace_input_with(node, fq)
        fq_of[node] = fq

    flatten_f = (torch.flatten, torch.reshape)
    flatten_m = ("flatten", "view", "reshape")
    maxpools_f = (F.max_pool2d, F.adaptive_max_pool2d)
    maxpools_m = (nn.MaxPool2d, nn.AdaptiveMaxPool2d)
    for node in list(graph.nodes):
        moves = ((node.op == "call_function" and node.target in flatten_f)
                 or (node.op == "call_method" and node.target in flatten_m)
                 or (node.op == "call_module" and isinstance(mods.get(node.target), nn.Flatten)))
        if moves and node.args and quantized_copy(node.args[0]) is not None:
            share_quantizer(node)
        elif node.op == "call_function" and node.target in (operator.getitem, F.pad) and node.args and node.args[0] in fq_of:
            # a slice/pad of an already-quantized tensor reads the quantized copy (as in ORT's graph), so the
            # float tensor has the Q as its only consumer and ORT can fold the ReLU before it
            node.replace_input_with(node.args[0], fq_of[node.args[0]])
        elif node.op == "call_module" and isinstance(mods.get(node.target), (nn.Conv2d, nn.Linear)):
            m = mods[node.target]
            if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
                continue
            parent, _, child = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, WeightFakeQuant(m, scheme.weight_range[1]))
            quantize_input(node, node.args[0])
            if isinstance(m, nn.Linear):
                quantize_output(node)  # ORT's quantizer also quantizes a Gemm's output (QGemm)
        elif (node.op == "call_function" and node.target in pools_f) or (node.op == "call_module" and isinstance(mods.get(node.target), pools_m)):
            quantize_input(node, node.args[0])  # pooling runs on int8 in ORT (QLinear pooling / pass-through)
            if node.target in maxpools_f or isinstance(mods.get(node.target), maxpools_m):
                share_quantizer(node)  # max pooling keeps its input's scale in ORT's graph (uint8 MaxPool)
            else:
                quantize_output(node)  # its own output range: QLinearGlobalAveragePool / QLinearAveragePool in ORT
        elif (node.op == "call_function" and node.target in adds) or (node.op == "call_method" and node.target in ("add", "add_")):
            tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
            if len(tensors) == 2:
                for a in tensors:
                    quantize_input(node, a)
                users = list(node.users)
                relu = len(users) == 1 and (
                    (users[0].op == "call_function" and users[0].target in (F.relu, torch.relu))
                    or (users[0].op == "call_module" and isinstance(mods.get(users[0].target), nn.ReLU))
                    or (users[0].op == "call_method" and users[0].target == "relu"))
                if not relu:
                    # QLinearAdd in ORT; before a ReLU the ReLU's output is quantized instead (by its
                    # consumer), as ORT's quantizer does: ORT then drops the ReLU into Q (zp = 0) and fuses the add
                    quantize_output(node)
    graph.lint()
    gm.recompile()
    return gm


def act_quantizers(gm: Any) -> list[Any]:
    return [m for m in gm.modules() if type(m).__name__ == "ActFakeQuant"]


def calibrate(gm: Any, x: np.ndarray, scheme: Scheme, *, method: str = "mse", percentile: float = 99.99, batch: int = 64) -> None:
    """Set every activation quantizer's (scale, zero point) from a calibration pass (ORT's formula)."""
    torch = _torch()
    from kdtoolkit.quant.calib import mse_range

    fqs = act_quantizers(gm)
    for f in fqs:
        f.observing, f.samples = True, []
    gm.eval()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            gm(torch.from_numpy(x[i:i + batch]))
    for f in fqs:
        v = np.concatenate(f.samples)
        f.samples, f.observing = [], False
        if method == "mse":
            lo, hi = mse_range(v, scheme)
        elif method == "percentile":
            lo, hi = float(np.percentile(v, 100 - percentile)), float(np.percentile(v, percentile))
        else:
            lo, hi = float(v.min()), float(v.max())
        s, zp = scheme.act_qparams(lo, hi)
        with torch.no_grad():
            f.scale.fill_(s)
            f.zero_point.fill_(zp)


def set_learn_scales(gm: Any, learn: bool) -> None:
    for f in act_quantizers(gm):
        f.learn = learn
        f.scale.requires_grad_(learn)


def _round_scales(gm: Any) -> None:
    """Keep trained scales positive (a scale <= 0 is not a quantizer)."""
    torch = _torch()
    with torch.no_grad():
        for f in act_quantizers(gm):
            f.scale.abs_().clamp_(min=1e-8)


def fold_weight_quantize(path: str | os.PathLike[str]) -> int:
    """Replace QuantizeLinear(float initializer) with its int8 result, as onnxruntime's quantizer stores
    weights; returns how many were folded. Uses the ONNX rounding (half to even) in numpy."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    # Constant nodes -> initializers, and Identity of an initializer -> the initializer itself, so the
    # Q/DQ parameters are plain initializers (what checkers and TensorRT's parser read most simply)
    alias: dict[str, str] = {}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            m.graph.initializer.append(t)
        else:
            nodes.append(n)
    inits = {i.name: i for i in m.graph.initializer}
    outputs = {o.name for o in m.graph.output}
    for n in nodes:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in outputs:
            alias[n.output[0]] = n.input[0]
    nodes = [n for n in nodes if n.output[0] not in alias]
    for n in nodes:
        for k in range(len(n.input)):
            while n.input[k] in alias:
                n.input[k] = alias[n.input[k]]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    consts: dict[str, Any] = {}

    def value(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return consts.get(name)

    keep, folded = [], 0
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and value(n.input[0]) is not None and all(value(i) is not None for i in n.input[1:]):
            w = value(n.input[0]).astype(np.float32)
            s = value(n.input[1]).astype(np.float32)
            zp = value(n.input[2])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            if s.ndim == 1 and s.size > 1:
                shape[axis] = -1
            info = np.iinfo(zp.dtype)
            q = np.clip(np.round(w / s.reshape(shape)) + zp.astype(np.int32).reshape(shape if zp.size > 1 else [1] * w.ndim), info.min, info.max)
            t = numpy_helper.from_array(q.astype(zp.dtype), n.output[0])
            m.graph.initializer.append(t)
            folded += 1
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    live = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(live)
    # per-tensor scales and zero points as scalars, as onnxruntime's quantizer writes them (its QDQ
    # fusions for Add and pooling look for scalar quantization parameters)
    byname = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for name in n.input[1:]:
                t = byname.get(name)
                if t is not None and len(t.dims) == 1 and t.dims[0] == 1:
                    arr = numpy_helper.to_array(t).reshape(())
                    t.CopyFrom(numpy_helper.from_array(arr, name))
    live_nodes = [n for n in m.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del m.graph.node[:]
    m.graph.node.extend(live_nodes)
    onnx.save(m, str(path))
    return folded


def export_qdq(gm: Any, input_shape: tuple[int, ...], out: str | os.PathLike[str], *, opset: int = 17) -> dict[str, Any]:
    """Export the fake-quant graph as QDQ ONNX (fake-quant -> QuantizeLinear/DequantizeLinear)."""
    from kdtoolkit import fsutil
    from kdtoolkit.export.onnx_export import check_onnx, export_onnx

    if opset < 13:
        raise InputError(f"per-channel QDQ needs ONNX opset 13 or newer, the target allows {opset}")
    _round_scales(gm)
    gm.eval()
    for m in gm.modules():
        if type(m).__name__ == "WeightFakeQuant":
            m.freeze()
    with fsutil.atomic_path(out, suffix=".onnx") as tmp:
        export_onnx(gm, input_shape, tmp, opset=opset)
        folded = fold_weight_quantize(tmp)
        slim = _slim_keeping_qdq(tmp)
        check_onnx(tmp)
    return {"weights_folded_to_int8": folded, "opset": opset, "simplified": slim}


def _slim_keeping_qdq(path: Path) -> bool:
    """onnxslim the exported QDQ graph (the strided shortcut slice exports as one Slice per axis and the pad
    widths as a shape computation; ORT's own graph has one Slice and constants). Kept only when every Q/DQ
    node survives, so the quantization is untouched."""
    import onnx

    from kdtoolkit.export.onnx_export import simplify

    def qdq(m: Any) -> int:
        return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)

    before = qdq(onnx.load(str(path)))
    slim = Path(str(path) + ".slim.onnx")
    try:
        simplify(path, slim)
        if qdq(onnx.load(str(slim))) != before:
            return False
        os.replace(slim, path)
        return True
    except Exception:  # the simplifier is an optimisation: the unsimplified graph is still correct
        return False
    finally:
        slim.unlink(missing_ok=True)


def run_qat(
    student: Any,
    teacher: Any,
    splits: Any,
    scheme: Scheme,
    cfg: QatConfig,
    work_dir: str | os.PathLike[str],
    *,
    calib_size: int = 512,
    loss: Any = None,
    progress: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Fold BN, insert fake-quant, calibrate, train under KD with the project's Trainer; return (graph, info)."""
    torch = _torch()
    from kdtoolkit.distill.trainer import TrainConfig, Trainer
    from kdtoolkit.quant.calib import calib_array

    torch.manual_seed(cfg.seed)
    gm = prepare_qat(student, scheme)
    n_calib = min(cfg.calib_size or calib_size, len(splits.train))
    x = calib_array(splits, n_calib, seed=cfg.seed)
    calibrate(gm, x, scheme, method=cfg.init)
    set_learn_scales(gm, cfg.learn_scales)
    info: dict[str, Any] = {"act_quantizers": len(act_quantizers(gm)), "calib_samples": n_calib, "init": cfg.init,
                            "learn_scales": cfg.learn_scales, "bn_folded": True}
    if cfg.epochs > 0 and (cfg.max_steps is None or cfg.max_steps > 0):
        bs = min(cfg.batch_size, len(splits.train))
        tc = TrainConfig(epochs=cfg.epochs, max_steps=cfg.max_steps, batch_size=bs, lr=cfg.lr, weight_decay=0.0,
                         optimizer="sgd", schedule="cosine", seed=cfg.seed, augment="none", grad_clip=5.0,
                         **({"loss": loss} if loss is not None else {}))
        res = Trainer(tc, Path(work_dir), progress=progress).fit(gm.train(), splits, teacher=teacher)
        gm = res["model"]
        info.update({"steps": res["steps"], "train_time_s": res["train_time_s"], "best_val_accuracy": res["best"]["val_accuracy"],
                     "train": tc.model_dump(mode="json")})
    gm.eval()
    return gm, info
