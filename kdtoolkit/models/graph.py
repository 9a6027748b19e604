"""Turn an exported graph back into a module tree that student surgery can rewrite.

A ``torch.export`` program (and a TorchScript file, converted to one) is a flat graph of aten
calls whose weights are inputs, so nothing in it can be replaced module by module. This module
rebuilds an ``fx.GraphModule`` from it in which every ``aten.conv2d``, ``aten.batch_norm`` and
``aten.linear`` call becomes a real ``nn.Conv2d`` / ``nn.BatchNorm*d`` / ``nn.Linear`` under its
original dotted name (``layer1.0.conv1``), ReLU and Add go back to ``torch.relu`` and ``+`` (so
QAT and the hint hooks see what they see in an eager model), and every other weight becomes a
parameter or buffer of the tree. The result trains, switches between train and eval, can be
re-exported, and needs no source code of the user's: it is how kdtoolkit stores a student whose
teacher came as a full pickle, a TorchScript file or a ``torch.export`` program.
"""

from __future__ import annotations

import operator
from typing import Any

from kdtoolkit.errors import InputError

EXPORT_BATCH_MAX = 4096


def mark_rebuilt(module: Any) -> Any:
    """Mark a module tree as rebuilt from a graph. The mark lives in ``GraphModule.meta``, which ``copy.deepcopy``
    keeps (an attribute set on a GraphModule is dropped by its deepcopy, and the student is cut from a deep copy)."""
    module.meta["kdt_graph"] = True
    return module


def is_rebuilt(module: Any) -> bool:
    """Whether ``module`` (or a deep copy of it) came from :func:`mark_rebuilt`."""
    meta = getattr(module, "meta", None)
    return isinstance(meta, dict) and bool(meta.get("kdt_graph"))


def _aten():
    import torch

    return torch.ops.aten


def _ensure_parent(root: Any, dotted: str) -> tuple[Any, str]:
    """Create intermediate container modules for ``a.b.c`` and return (parent, leaf name)."""
    from torch import nn

    *parents, leaf = dotted.split(".")
    cur = root
    for p in parents:
        if not hasattr(cur, p) or not isinstance(getattr(cur, p), nn.Module):
            cur.add_module(p, nn.Module())
        cur = getattr(cur, p)
    return cur, leaf


def _module_name(weight_name: str | None, fallback: str, used: set[str]) -> str:
    base = weight_name.rsplit(".", 1)[0] if weight_name and "." in weight_name else fallback
    name, i = base, 1
    while name in used or not all(part.isidentifier() or part.isdigit() for part in name.split(".")):
        name = f"{fallback}_{i}"
        i += 1
    used.add(name)
    return name


def modules_from_program(ep: Any) -> Any:
    """An eager ``fx.GraphModule`` with real Conv/BN/Linear modules, from an ExportedProgram."""
    import torch
    from torch import fx, nn

    aten = _aten()
    sig = ep.graph_signature
    state = {**ep.state_dict, **getattr(ep, "constants", {})}
    to_param = dict(sig.inputs_to_parameters)
    to_buffer = dict(sig.inputs_to_buffers)
    to_const = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    user_inputs = list(sig.user_inputs)
    user_outputs = list(sig.user_outputs)  # a program exported in training mode also returns buffer mutations first

    root = nn.Module()
    graph = fx.Graph()
    env: dict[Any, Any] = {}
    used: set[str] = set()
    weights_by_node: dict[str, str] = {}  # placeholder name -> state name
    for node in ep.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        if node.name in to_param or node.name in to_buffer or node.name in to_const:
            weights_by_node[node.name] = to_param.get(node.name) or to_buffer.get(node.name) or to_const[node.name]
    absorbed: set[str] = set()  # weights that went into a module
    sized: set[str] = set()  # nodes holding a dynamic size (sym_size and arithmetic on it)

    def state_tensor(n: Any) -> Any:
        if isinstance(n, fx.Node) and n.name in weights_by_node:
            return state[weights_by_node[n.name]]
        return None

    def wname(n: Any) -> str | None:
        return weights_by_node.get(n.name) if isinstance(n, fx.Node) else None

    def arg(a: Any) -> Any:
        return fx.map_arg(a, lambda n: env[n.name])

    def get_attr_for(n: Any) -> Any:
        """A weight used by an op that is not turned into a module: keep it as a parameter or buffer."""
        key = weights_by_node[n.name]
        if key in absorbed:
            raise InputError(f"the exported graph shares weight {key!r} between a layer and another op; it cannot be split into modules")
        target = key if all(p.isidentifier() or p.isdigit() for p in key.split(".")) else key.replace(".", "_")
        parent, leaf = _ensure_parent(root, target)
        if not hasattr(parent, leaf):
            t = state[key]
            if key in to_param.values() or (not to_param and t.is_floating_point() and key.endswith((".weight", ".bias"))):
                # TorchScript programs lift every weight as a buffer; weights and biases are trainable
                parent.register_parameter(leaf, nn.Parameter(t.detach().clone()))
            else:
                parent.register_buffer(leaf, t.detach().clone())
        return graph.get_attr(target)

    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder":
            if node.name in weights_by_node:
                continue
            if node.target in user_inputs or node.name in user_inputs:
                env[node.name] = graph.placeholder(node.name)
                env[node.name].meta = dict(node.meta)
                continue
            raise InputError(f"the exported graph has an input {node.name!r} that is neither a weight nor a user input")
        if node.op == "output":
            outs = node.args[0][len(node.args[0]) - len(user_outputs):]  # user outputs come after buffer mutations
            vals = [arg(o) for o in outs]
            graph.output(vals[0] if len(vals) == 1 else tuple(vals))
            continue
        if node.op != "call_function":
            raise InputError(f"the exported graph has a {node.op} node ({node.target}); only plain aten graphs are supported")
        t = node.target
        a = list(node.args)
        reads = _reads_sizes(a, sized)  # a dynamic size among the arguments
        new = None
        if t is aten.convolution.default and len(a) >= 9 and not a[6] and len(a[3]) == 2:
            # TorchScript's form: (x, w, b, stride, padding, dilation, transposed, output_padding, groups)
            t, a = aten.conv2d.default, [a[0], a[1], a[2], a[3], a[4], a[5], a[8]]
        if t is aten.conv2d.default and state_tensor(a[1]) is not None and (len(a) < 3 or a[2] is None or state_tensor(a[2]) is not None):
            w = state_tensor(a[1])
            b = state_tensor(a[2]) if len(a) > 2 and a[2] is not None else None
            stride, padding, dilation, groups = (list(a[3]) if len(a) > 3 else [1, 1]), (a[4] if len(a) > 4 else [0, 0]), \
                (list(a[5]) if len(a) > 5 else [1, 1]), (a[6] if len(a) > 6 else 1)
            if isinstance(padding, str):
                pad: Any = padding
            else:
                pad = tuple(padding)
            conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), tuple(stride), pad, tuple(dilation), groups,
                             bias=b is not None)
            with torch.no_grad():
                conv.weight.copy_(w)
                if b is not None:
                    conv.bias.copy_(b)
            new = _add_module(root, graph, _module_name(wname(a[1]), "conv", used), conv, [arg(a[0])])
            absorbed.update(filter(None, [wname(a[1]), wname(a[2]) if len(a) > 2 else None]))
        elif t is aten.linear.default and state_tensor(a[1]) is not None and (len(a) < 3 or a[2] is None or state_tensor(a[2]) is not None):
            w = state_tensor(a[1])
            b = state_tensor(a[2]) if len(a) > 2 and a[2] is not None else None
            lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            new = _add_module(root, graph, _module_name(wname(a[1]), "linear", used), lin, [arg(a[0])])
            absorbed.update(filter(None, [wname(a[1]), wname(a[2]) if len(a) > 2 else None]))
        elif t is aten.batch_norm.default and all(x is None or state_tensor(x) is not None for x in a[1:5]) \
                and state_tensor(a[3]) is not None:
            rm, rv = state_tensor(a[3]), state_tensor(a[4])
            w, b = state_tensor(a[1]), state_tensor(a[2])
            rank = len(node.meta["val"].shape) if "val" in node.meta else 4
            cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, nn.BatchNorm2d)
            bn = cls(rm.shape[0], eps=float(a[7]), momentum=float(a[6]) if a[6] is not None else None, affine=w is not None)
            with torch.no_grad():
                bn.running_mean.copy_(rm)
                bn.running_var.copy_(rv)
                if w is not None:
                    bn.weight.copy_(w)
                    bn.bias.copy_(b)
            wn = wname(a[3])
            new = _add_module(root, graph, _module_name(wn, "bn", used), bn, [arg(a[0])])
            absorbed.update(filter(None, [wname(x) for x in a[1:5]]))
            tracked = (wn or "").rsplit(".", 1)[0] + ".num_batches_tracked"
            absorbed.add(tracked)
        elif t is aten.sym_size.int and isinstance(a[0], fx.Node):
            # a dynamic dimension (a ViT's class-token expand reads the batch): ``x.size(d)`` stays an op when the
            # module is re-exported to ONNX, where aten.sym_size would be traced to a constant (batch 1 forever)
            new = graph.call_method("size", (arg(a[0]), a[1]))
        elif t in (aten.relu.default, aten.relu_.default):
            new = graph.call_function(torch.relu, (arg(a[0]),))
        elif t in (aten.add.Tensor, aten.add_.Tensor) and len(a) == 2 and not node.kwargs \
                and all(isinstance(x, fx.Node) and x.name not in weights_by_node for x in a):  # a weight added (ViT pos_embed) is generic
            new = graph.call_function(operator.add, (arg(a[0]), arg(a[1])))
        else:
            args = fx.map_arg(tuple(a), lambda n: get_attr_for(n) if n.name in weights_by_node else env[n.name])
            kwargs = fx.map_arg(dict(node.kwargs), lambda n: get_attr_for(n) if n.name in weights_by_node else env[n.name])
            new = graph.call_function(_size_preserving(t) if reads else t, args, kwargs)
        if t is aten.sym_size.int or (not isinstance(t, torch._ops.OpOverload) and reads):
            sized.add(node.name)  # a dynamic size, or arithmetic on one (operator.mul of sym ints)
        new.meta = dict(node.meta)
        env[node.name] = new
    gm = fx.GraphModule(root, graph, class_name="ExportedModel")
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def _reads_sizes(args: Any, sized: set[str]) -> bool:
    """Whether an op's arguments hold a dynamic size (a reshape to ``[batch, 50, 3, 2, 16]``)."""
    from torch import fx

    found = False

    def visit(n: Any) -> Any:
        nonlocal found
        found = found or n.name in sized
        return n

    fx.map_arg(tuple(args), visit)
    return found


def _size_preserving(op: Any) -> Any:
    """The torch function for an aten overload that takes sizes. The ONNX exporter traces a size passed to an aten
    overload as a constant (batch 1 forever) but keeps it dynamic through ``torch.reshape`` / ``Tensor.expand``."""
    import torch

    name = op._overloadpacket.__name__ if hasattr(op, "_overloadpacket") else ""
    name = {"_unsafe_view": "reshape", "view": "reshape"}.get(name, name)
    fn = getattr(torch, name, None) or getattr(torch.Tensor, name, None)
    return fn if callable(fn) else op


def _add_module(root: Any, graph: Any, name: str, mod: Any, args: list[Any]) -> Any:
    parent, leaf = _ensure_parent(root, name)
    parent.add_module(leaf, mod)
    return graph.call_module(name, tuple(args))


def export_program(module: Any, input_shape: tuple[int, ...], *, dynamic_batch: bool = True) -> Any:
    """``torch.export`` a module in eval mode with a dynamic batch axis (the stored form of graph students)."""
    import torch

    was = module.training if hasattr(module, "training") else False
    module.eval()
    example = torch.zeros(max(2, input_shape[0]), *input_shape[1:])
    dyn = ({0: torch.export.Dim("batch", min=1, max=EXPORT_BATCH_MAX)},) if dynamic_batch else None
    try:
        with torch.no_grad():
            ep = torch.export.export(module, (example,), dynamic_shapes=dyn, strict=False)
    except Exception as exc:  # torch raises many types when a model does not export
        if dynamic_batch:
            try:
                with torch.no_grad():
                    ep = torch.export.export(module, (example[:1],), strict=False)
            except Exception:
                raise InputError(f"torch.export failed on the model: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        else:
            raise InputError(f"torch.export failed on the model: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
    finally:
        if was:
            module.train()
    return ep


def save_program(module: Any, path: Any, input_shape: tuple[int, ...]) -> None:
    """Write ``module`` as a ``torch.export`` program (atomically)."""
    import io

    import torch

    from kdtoolkit import fsutil

    ep = export_program(module, input_shape)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    fsutil.write_bytes(path, buf.getvalue())


def program_from_torchscript(mod: Any, input_shape: tuple[int, ...]) -> Any:
    """Convert a TorchScript module to an ExportedProgram with torch's own converter (``TS2EPConverter``)."""
    import torch

    try:
        from torch._export.converter import TS2EPConverter
    except ImportError:
        raise InputError("this torch has no TorchScript-to-export converter; export the model with torch.export instead") from None
    example = torch.zeros(1, *input_shape[1:])
    try:
        return TS2EPConverter(mod, (example,)).convert()
    except Exception as exc:
        raise InputError(f"the TorchScript graph could not be converted for surgery ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from None
