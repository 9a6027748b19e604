"""INT8 for ONNX Runtime CPU is never worse than ORT's own quantizer: same Q/DQ placement, same fusions.

The reference is onnxruntime.quantization.quantize_static (QDQ, u8 activations, per-channel s8 weights,
MinMax); kdtoolkit's PTQ and QAT graphs must end up as the same fused kernels in ORT's optimised graph.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import shared_file


def _scheme(reduce_range: bool = False):
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    return scheme_for(load_profile("ort-cpu"), reduce_range=reduce_range)


def _ops(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _ort_ops(path: Path, tmp: Path) -> collections.Counter:
    """Op types of ORT's optimised graph (what actually runs)."""
    import onnxruntime as ort

    from kdtoolkit.backends.ort import session_options

    out = tmp / f"{path.stem}.opt.onnx"
    ort.InferenceSession(str(path), sess_options=session_options(level="extended", optimized_path=str(out)), providers=["CPUExecutionProvider"])
    return _ops(out)


def _ort_reference(fp32: Path, out: Path, x: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from kdtoolkit.quant.ptq import _Reader

    quantize_static(str(fp32), str(out), _Reader("input", x), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return out


@pytest.fixture(scope="module")
def resnet8(tmp_path_factory):
    """A CIFAR ResNet-8 (ReLU after every conv, option-A shortcuts, GAP, Linear) with non-trivial BN, its ONNX, data."""
    from kdtoolkit.export.onnx_export import export_onnx, simplify
    from kdtoolkit.models.zoo import ARCHS

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ort_int8")
    m = ARCHS.get("cifar_resnet8")(num_classes=10, in_channels=3).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    export_onnx(m, (1, 3, 32, 32), d / "raw.onnx")
    simplify(d / "raw.onnx", d / "fp32.onnx")
    x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    return m, d / "fp32.onnx", x, d


def test_ptq_places_qdq_like_quantize_static(resnet8):
    """Fails if the scheme again restricts ORT's op list: every ReLU then keeps its own Q/DQ pair
    (ResNet-56: 141 QuantizeLinear against ORT's 90) and ORT cannot fold it into the conv's output."""
    from kdtoolkit.quant.ptq import quantize_onnx

    _, fp32, x, d = resnet8
    ref = _ort_reference(fp32, d / "ort.onnx", x)
    info = quantize_onnx(fp32, d / "ours.onnx", x, _scheme(), method="minmax")
    ours, theirs = _ops(d / "ours.onnx"), _ops(ref)
    assert ours["QuantizeLinear"] == theirs["QuantizeLinear"] and ours["DequantizeLinear"] == theirs["DequantizeLinear"]
    assert ours["Relu"] == 0 == theirs["Relu"]
    run_ours, run_theirs = _ort_ops(d / "ours.onnx", d), _ort_ops(ref, d)
    assert run_ours["QLinearConv"] == run_theirs["QLinearConv"] == _ops(fp32)["Conv"]
    assert run_ours["QLinearAdd"] == run_theirs["QLinearAdd"] > 0
    # the only difference: the stem's float input padded 3 -> 4 channels (see test below)
    assert run_ours - run_theirs == collections.Counter({"Pad": 1})
    assert info["channel_aligned_convs"] == ["/conv1/Conv"]


def test_stem_channel_padding_is_exact(resnet8):
    """3 -> 4 input channels (zero input, zero weight) gives the same outputs as ORT's own graph."""
    import onnx
    from onnx import numpy_helper

    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.quant.ptq import quantize_onnx

    _, fp32, x, d = resnet8
    ref = d / "ort.onnx" if (d / "ort.onnx").exists() else _ort_reference(fp32, d / "ort.onnx", x)
    out = d / "ours2.onnx"
    quantize_onnx(fp32, out, x, _scheme(), method="minmax")
    m = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    stem = next(n for n in m.graph.node if n.op_type == "Conv")
    w = inits[prod[stem.input[1]].input[0]]
    assert w.shape[1] == 4 and not w[:, 3].any()
    xt = np.random.default_rng(1).standard_normal((32, 3, 32, 32)).astype(np.float32)
    a, b = make_session(ref).run(None, {"input": xt})[0], make_session(out).run(None, {"input": xt})[0]
    out_scale = float(inits[next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "logits").input[1]])
    assert np.abs(a - b).max() <= out_scale + 1e-6  # at most one output step (kernels may round differently)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


def test_qat_graph_fuses_like_quantize_static(resnet8):
    """QAT's exported QDQ graph runs as the same kernels as ORT's PTQ graph: ReLUs folded, QLinearAdd,
    QLinearGlobalAveragePool, uint8 Flatten, QGemm. Fails if average pooling's output or the flatten
    between it and the Linear is left without (a shared) quantizer: ORT then runs them in float."""
    from kdtoolkit.quant.qat import calibrate, export_qdq, prepare_qat

    model, fp32, x, d = resnet8
    ref = d / "ort.onnx" if (d / "ort.onnx").exists() else _ort_reference(fp32, d / "ort.onnx", x)
    sch = _scheme()
    gm = prepare_qat(model, sch)
    calibrate(gm, x, sch, method="minmax")
    info = export_qdq(gm, (1, 3, 32, 32), d / "qat.onnx")
    assert info["simplified"] is True
    assert _ort_ops(d / "qat.onnx", d) == _ort_ops(ref, d)


def test_auto_reason_quotes_every_batch_and_decides_at_opt():
    from kdtoolkit.quant.schemes import pick_precision

    kw = dict(fp32_acc=0.90, int8_acc=0.899, tolerance_points=1.0)
    p, why = pick_precision("auto", fp32_ms=1.3, int8_ms=1.0, batch=1, by_batch={1: (1.3, 1.0), 64: (10.0, 12.5)}, **kw)
    assert p == "int8" and "batch 64 0.80x" in why and "opt batch 1" in why
    p, why = pick_precision("auto", fp32_ms=10.0, int8_ms=12.5, batch=64, by_batch={1: (1.3, 1.0), 64: (10.0, 12.5)}, **kw)
    assert p == "fp32" and "batch 1 1.30x" in why


@pytest.mark.slow
def test_ptq_accuracy_equals_quantize_static_on_real_cifar(tmp_path):
    """The fine-tuned ResNet-56 on 1,000 real JPEG test images: kdtoolkit's ort-cpu PTQ within 0.1 point of ORT's."""
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.data import load_data
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.export.onnx_export import export_onnx, simplify
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.quant.ptq import calib_array, quantize_onnx

    tar = shared_file("cifar10-jpeg.tar.gz")
    w = shared_file("weights/resnet56-cifar10-jpeg-ft.th")
    splits = load_data(str(tar), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), test_limit=1000, train_limit=5000)
    export_onnx(load_model(str(w), arch="cifar_resnet56").module.eval(), (1, 3, 32, 32), tmp_path / "raw.onnx")
    simplify(tmp_path / "raw.onnx", tmp_path / "fp32.onnx")
    x = calib_array(splits, 128)
    ref = _ort_reference(tmp_path / "fp32.onnx", tmp_path / "ort.onnx", x)
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "ours.onnx", x, _scheme(), method="minmax")
    a_ref = evaluate(make_session(ref), splits.test, splits.spec)["accuracy"]
    a_ours = evaluate(make_session(tmp_path / "ours.onnx"), splits.test, splits.spec)["accuracy"]
    assert a_ref > 0.85
    assert a_ours >= a_ref - 0.001
    assert _ops(tmp_path / "ours.onnx")["QuantizeLinear"] == _ops(ref)["QuantizeLinear"] == 90


def test_stem_padding_drops_recorded_shapes_of_the_padded_qdq(tmp_path):
    """A QAT export may record value_info for the stem's Q/DQ outputs and its weight's DQ; after padding 1 -> 4
    channels those shapes are stale and shape inference refused the model (seen twice in CI on a 1-channel MNIST
    student: first the activation pair, then the weight's DQ)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kdtoolkit.quant.ptq import align_input_channels

    def init(name, a):
        return numpy_helper.from_array(a, name)

    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dqw", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    vi = [helper.make_tensor_value_info("xq", TensorProto.UINT8, ["N", 1, 8, 8]),
          helper.make_tensor_value_info("xd", TensorProto.FLOAT, ["N", 1, 8, 8]),
          helper.make_tensor_value_info("wd", TensorProto.FLOAT, [4, 1, 3, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [init("w", np.ones((4, 1, 3, 3), np.int8)), init("s", np.array(0.1, np.float32)),
                               init("z", np.array(0, np.uint8)), init("ws", np.full(4, 0.1, np.float32)), init("wz", np.zeros(4, np.int8))],
                              value_info=vi)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert align_input_channels(path) == ["conv"]
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True))
