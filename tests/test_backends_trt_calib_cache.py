"""Q/DQ scales -> TensorRT calibration cache + Q/DQ-free ONNX (DLA below TensorRT 11), checked against ONNX Runtime."""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kdtoolkit.backends.trt.calib_cache import cache_text, read_calibration_cache, strip_qdq, write_calibration_cache_from_qdq
from kdtoolkit.errors import InputError


def _model(act_scale=0.05, per_channel_act=False, r_scale=0.1):
    """x -Q/DQ-> Conv(int8 W via DQ) -> Relu -Q/DQ-> MaxPool -> y: one weight DQ, two activation pairs."""
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    s_x = np.full(3, act_scale, np.float32) if per_channel_act else np.array(act_scale, np.float32)
    z_x = np.zeros(3, np.int8) if per_channel_act else np.array(0, np.int8)
    inits = [numpy_helper.from_array(s_x, "s_x"), numpy_helper.from_array(z_x, "z_x"), numpy_helper.from_array(wq, "wq"),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "s_w"), numpy_helper.from_array(np.zeros(4, np.int8), "z_w"),
             numpy_helper.from_array(np.array(r_scale, np.float32), "s_r"), numpy_helper.from_array(np.array(0, np.int8), "z_r")]
    kw = {"axis": 1} if per_channel_act else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"], name="q_x", **kw),
             helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"], name="dq_x", **kw),
             helper.make_node("DequantizeLinear", ["wq", "s_w", "z_w"], ["wd"], name="dq_w", axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("QuantizeLinear", ["r", "s_r", "z_r"], ["rq"], name="q_r"),
             helper.make_node("DequantizeLinear", ["rq", "s_r", "z_r"], ["rd"], name="dq_r"),
             helper.make_node("MaxPool", ["rd"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_strip_keeps_tensor_names_and_collects_scales():
    stripped, scales, info = strip_qdq(_model())
    onnx.checker.check_model(stripped)
    assert [n.op_type for n in stripped.graph.node] == ["Conv", "Relu", "MaxPool"]
    conv = stripped.graph.node[0]
    assert conv.input[0] == "x" and conv.input[1] == "wd"  # the parser's tensor names: the cache keys
    assert scales["x"] == pytest.approx(0.05) and scales["r"] == pytest.approx(0.1)
    assert scales["c"] == pytest.approx(0.1) and scales["y"] == pytest.approx(0.1)  # carried across Relu and MaxPool
    assert info["weights_dequantized"] == 1 and info["propagated"] == 2
    w = numpy_helper.to_array(next(t for t in stripped.graph.initializer if t.name == "wd"))
    assert w.dtype == np.float32 and np.allclose(w / 0.01, np.round(w / 0.01))  # the fake-quantized weights, in FP32
    assert not {t.name for t in stripped.graph.initializer} & {"s_x", "z_x", "wq", "s_w", "z_w"}


def test_stripped_graph_matches_the_qdq_graph_within_the_activation_step():
    import onnxruntime as ort

    m = _model(r_scale=1.0)
    stripped, _, _ = strip_qdq(m)
    # inputs on the input's quantization grid: then only r's rounding (half a step, 0.5) separates the two graphs
    x = (np.round(np.random.default_rng(1).uniform(-3, 3, (1, 3, 8, 8)) / 0.05) * 0.05).astype(np.float32)
    run = lambda mod: ort.InferenceSession(mod.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    a, b = run(m), run(stripped)
    assert np.abs(b).max() < 127 * 1.0  # no saturation in this check
    assert np.abs(a - b).max() <= 0.5 + 1e-4


def test_cache_format_is_tensorrts_text_format(tmp_path):
    text = cache_text({"x": 0.05, "/a/Relu_output_0": 1.0}, "8.6.1")
    lines = text.splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert lines[1] == "x: " + struct.pack(">f", 0.05).hex() and lines[2] == "/a/Relu_output_0: 3f800000"
    assert cache_text({"x": 1.0}, "10.3.0").splitlines()[0] == "TRT-100300-EntropyCalibration2"
    (tmp_path / "c.cache").write_text(text)
    header, scales = read_calibration_cache(tmp_path / "c.cache")
    assert header == lines[0] and scales["x"] == pytest.approx(0.05) and scales["/a/Relu_output_0"] == 1.0


def test_write_from_qdq_writes_both_files(tmp_path):
    onnx.save(_model(), str(tmp_path / "model.onnx"))
    info = write_calibration_cache_from_qdq(tmp_path / "model.onnx", tmp_path / "calibration.cache", tensorrt_version="8.5")
    assert (tmp_path / "model_noqdq.onnx").is_file() and info["activation_scales"] == 4
    header, scales = read_calibration_cache(tmp_path / "calibration.cache")
    names = {o for n in onnx.load(str(tmp_path / "model_noqdq.onnx")).graph.node for o in n.output} | {"x"}
    assert header == "TRT-8500-EntropyCalibration2" and set(scales) <= names


def test_per_channel_activation_scales_cannot_go_into_a_cache():
    with pytest.raises(InputError, match="per tensor"):
        strip_qdq(_model(per_channel_act=True))


def test_bad_cache_files_are_input_errors(tmp_path):
    (tmp_path / "a").write_text("hello\n")
    with pytest.raises(InputError, match="not a TensorRT calibration cache"):
        read_calibration_cache(tmp_path / "a")
    (tmp_path / "b").write_text("TRT-8500-EntropyCalibration2\nx: zz\n")
    with pytest.raises(InputError, match="bad calibration cache line"):
        read_calibration_cache(tmp_path / "b")
