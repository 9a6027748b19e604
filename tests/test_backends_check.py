"""Static TensorRT check: a crafted ONNX graph for each rule, a clean exported ResNet-20, the CLI's exit codes and lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_cli
from onnx import TensorProto, helper, numpy_helper

from kdtoolkit.backends.check import check_file, check_model, dla_reason, parser_supports
from kdtoolkit.errors import InputError
from kdtoolkit.quant.qdq_rules import qdq_findings
from kdtoolkit.targets import load_profile, parse_profile

ORIN = load_profile("jetson-agx-orin")
DLA = load_profile("jetson-agx-orin-dla")


def _model(nodes, inits, *, x_shape=("batch", 3, 16, 16), y_shape=None, opset=17, x_type=TensorProto.FLOAT, extra_opsets=()):
    x = helper.make_tensor_value_info("x", x_type, list(x_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape or ["n", "c", "h", "w"])
    g = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 8
    return m


def _w(shape=(4, 3, 3, 3), dtype=np.float32, name="w"):
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(dtype), name)


def _conv_relu(**kw):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [_w()], **kw)


def rules(rep, severity=None):
    return [(f.rule, f.node) for f in rep.findings if severity is None or f.severity == severity]


def test_clean_conv_passes_every_tensorrt_profile():
    for name in ("jetson-agx-orin", "jetson-orin-nano", "desktop-gpu"):
        rep = check_model(_conv_relu(), load_profile(name))
        assert rep.ok, (name, rep.lines())
    # desktop-gpu is auto: an FP32 ONNX builds FP16, nothing to say; the int8 Jetson profiles need calibration for it
    assert check_model(_conv_relu(), load_profile("desktop-gpu")).findings == []
    assert rules(check_model(_conv_relu(), ORIN)) == [("int8.calibration", "")]


def test_unsupported_op_is_an_error_naming_the_node():
    nodes = [helper.make_node("Hardmax", ["x"], ["y"], name="hm", axis=1)]
    rep = check_model(_model(nodes, []), ORIN)
    assert ("unsupported-op", "hm") in rules(rep, "error")
    assert "Hardmax is not supported by the TensorRT 8.5 ONNX parser" in rep.lines()[0]


def test_op_added_in_a_later_parser_depends_on_the_version():
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln", axis=-1)]
    inits = [numpy_helper.from_array(np.ones(16, np.float32), "s"), numpy_helper.from_array(np.zeros(16, np.float32), "b")]
    m = _model(nodes, inits)
    assert ("unsupported-op", "ln") in rules(check_model(m, ORIN), "error")  # min_version 8.5
    assert check_model(m, ORIN, tensorrt_version="8.6.1").ok
    assert check_model(m, load_profile("desktop-gpu")).ok  # min_version 10.0
    assert parser_supports("Conv") is True and parser_supports("Unique") is False and parser_supports("NoSuchOp") is None


def test_unknown_and_custom_domain_ops():
    nodes = [helper.make_node("Gelu", ["x"], ["y"], name="gelu", domain="com.microsoft")]
    rep = check_model(_model(nodes, [], extra_opsets=[helper.make_opsetid("com.microsoft", 1)]), ORIN)
    assert ("unsupported-op", "gelu") in rules(rep, "error")


def _qdq_act(zp_value=0, zp_dtype=np.int8, scale=np.float32(0.05)):
    return [numpy_helper.from_array(np.array(scale, np.float32), "s_x"), numpy_helper.from_array(np.array(zp_value, zp_dtype), "z_x")]


def _qdq_model(*, act_zp=0, act_zp_dtype=np.int8, w_scale=None, w_axis=0, w_zp=None):
    """x -> Q -> DQ -> Conv(W from DQ of int8 weights) -> y; each knob breaks one rule."""
    wq = np.random.default_rng(1).integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    w_scale = np.full(4, 0.01, np.float32) if w_scale is None else w_scale
    w_zp = np.zeros(w_scale.shape, np.int8) if w_zp is None else w_zp
    inits = [*_qdq_act(act_zp, act_zp_dtype), numpy_helper.from_array(wq, "wq"),
             numpy_helper.from_array(w_scale, "s_w"), numpy_helper.from_array(w_zp, "z_w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "z_x"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s_x", "z_x"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["wq", "s_w", "z_w"], ["wd"], name="dq_w", axis=w_axis),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    return _model(nodes, inits)


def test_well_formed_tensorrt_qdq_has_no_findings():
    m = _qdq_model()
    onnx.checker.check_model(m)
    assert qdq_findings(m, "tensorrt") == []
    assert check_model(m, ORIN).findings == []


def test_nonzero_zero_point_is_an_error():
    rep = check_model(_qdq_model(act_zp=3), ORIN)
    assert ("qdq.zero_point", "q_x") in rules(rep, "error") and ("qdq.zero_point", "dq_x") in rules(rep, "error")
    assert any("must be 0" in line and "got 1 non-zero value(s), e.g. 3" in line for line in rep.lines())


def test_uint8_activations_are_wrong_for_tensorrt_but_right_for_ort_x86():
    m = _qdq_model(act_zp=128, act_zp_dtype=np.uint8)
    assert ("qdq.dtype", "q_x") in rules(check_model(m, ORIN), "error")
    assert [f for f in qdq_findings(m, "ort_x86") if f.severity == "error"] == []


def test_per_tensor_weight_scales_are_flagged():
    m = _qdq_model(w_scale=np.array(0.01, np.float32), w_zp=np.array(0, np.int8))
    rep = check_model(m, ORIN)
    assert ("qdq.weight_per_channel", "dq_w") in rules(rep, "warning")
    assert "per output channel (axis 0)" in "\n".join(rep.lines())


def test_weight_scales_on_the_wrong_axis_are_an_error():
    m = _qdq_model(w_scale=np.full(3, 0.01, np.float32), w_axis=1)
    assert ("qdq.weight_axis", "dq_w") in rules(check_model(m, ORIN), "error")


def test_per_channel_activation_scales_are_an_error():
    m = _qdq_model()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.full(3, 0.05, np.float32), "s_x"))
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(3, np.int8), "z_x"))
    for n in m.graph.node[:2]:
        n.attribute.append(helper.make_attribute("axis", 1))
    assert ("qdq.activation_per_tensor", "q_x") in rules(check_model(m, ORIN), "error")


def test_qlinearconv_is_rejected():
    u8 = lambda v, n: numpy_helper.from_array(np.array(v, np.uint8), n)  # noqa: E731
    f32 = lambda v, n: numpy_helper.from_array(np.array(v, np.float32), n)  # noqa: E731
    wq = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.uint8), "wq")
    inits = [f32(0.1, "xs"), u8(128, "xz"), wq, f32(0.01, "ws"), u8(128, "wz"), f32(0.2, "ys"), u8(128, "yz")]
    nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["yq"], name="qconv"),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dq_y")]
    m = _model(nodes, inits, x_type=TensorProto.UINT8)
    onnx.checker.check_model(m)
    rep = check_model(m, ORIN)
    assert ("qdq.qoperator", "qconv") in rules(rep, "error")
    assert ("unsupported-op", "qconv") in rules(rep, "error")


def _profile(text: str, base: str = "jetson-agx-orin-dla"):
    src = (Path(__file__).resolve().parents[1] / "kdtoolkit" / "builtin_profiles" / f"{base}.yaml").read_text()
    return parse_profile(src + text, base)


def test_dynamic_batch_under_a_static_shape_profile_is_an_error():
    prof = _profile("static_input_shape: [1, 3, 16, 16]\n", "jetson-agx-orin")
    rep = check_model(_conv_relu(), prof)
    assert ("dynamic-shape", "input:x") in rules(rep, "error")
    assert "re-export with --static-batch" in "\n".join(rep.lines())
    assert check_model(_conv_relu(x_shape=(1, 3, 16, 16)), prof).ok
    assert ("static-shape", "input:x") in rules(check_model(_conv_relu(x_shape=(1, 3, 32, 32)), prof), "error")


def test_dynamic_batch_on_dla_is_pinned_or_refused():
    assert ("dynamic-shape", "input:x") in rules(check_model(_conv_relu(), DLA), "warning")  # batch 1/1/1: pinned
    ranged = DLA.model_copy(update={"batch": DLA.batch.model_copy(update={"max": 4})})
    assert ("dynamic-shape", "input:x") in rules(check_model(_conv_relu(), ranged), "error")


def test_dynamic_spatial_axes_and_fixed_batch_mismatch():
    assert ("dynamic-shape", "input:x") in rules(check_model(_conv_relu(x_shape=("batch", 3, "h", "w")), ORIN), "error")
    assert ("batch-range", "input:x") in rules(check_model(_conv_relu(x_shape=(1, 3, 16, 16)), ORIN), "error")


def test_opset_newer_than_the_profile_accepts():
    rep = check_model(_conv_relu(opset=18), ORIN)
    assert ("opset", "") in rules(rep, "error")
    assert "opset 18 is newer than profile jetson-agx-orin accepts (max_opset 17)" in rep.lines()[0]
    assert check_model(_conv_relu(opset=18), load_profile("desktop-gpu")).ok  # max_opset 20


def test_dla_unsupported_layers_fall_back_or_fail():
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], name="pool9", kernel_shape=[9, 9]),
             helper.make_node("Elu", ["p"], ["y"], name="elu")]
    m = _model(nodes, [], x_shape=(1, 3, 16, 16))
    rep = check_model(m, DLA)
    assert {("dla.fallback", "pool9"), ("dla.fallback", "elu")} <= set(rules(rep, "warning")) and rep.ok
    assert "window [9, 9] is outside DLA's 1..8; falls back to the GPU" in "\n".join(rep.lines())
    strict = DLA.model_copy(update={"tensorrt": DLA.tensorrt.model_copy(update={"gpu_fallback": False})})
    rep = check_model(m, strict)
    assert ("dla.fallback", "pool9") in rules(rep, "error") and not rep.ok
    assert not [r for r, _ in rules(check_model(m, ORIN)) if r.startswith("dla.")]  # the GPU profile has no DLA rules


@pytest.mark.parametrize("node,ok", [
    (helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2]), True),
    (helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], strides=[9, 9]), False),
    (helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], dilations=[33, 33]), False),
    (helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[33, 33]), False),
    (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[8, 8]), True),
    (helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], pads=[8, 8, 8, 8]), False),
    (helper.make_node("LeakyRelu", ["x"], ["y"]), True),
    (helper.make_node("Softplus", ["x"], ["y"]), False),
    (helper.make_node("Concat", ["x", "x"], ["y"], axis=1), True),
    (helper.make_node("Concat", ["x", "x"], ["y"], axis=2), False),
    (helper.make_node("LRN", ["x"], ["y"], size=5), True),
    (helper.make_node("LRN", ["x"], ["y"], size=4), False),
])
def test_dla_layer_limits(node, ok):
    shapes = {"x": [1, 3, 16, 16], "y": [1, 3, 16, 16], "w": [4, 3, 3, 3]}
    assert (dla_reason(node, shapes, {}) is None) is ok


def test_dla_refuses_fp32_and_a_qdq_onnx_without_a_calibration_cache_before_tensorrt_11(tmp_path):
    """Issue 15.1: a Q/DQ ONNX cannot build on DLA below TensorRT 11 unless its scales come as a calibration cache."""
    fp32 = DLA.model_copy(update={"precision": "fp32"})
    assert ("dla.precision", "") in rules(check_model(_conv_relu(x_shape=(1, 3, 16, 16)), fp32), "error")
    m = _qdq_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    rep = check_model(m, DLA)
    assert ("dla.qdq", "") in rules(rep, "error") and not rep.ok
    assert "no calibration cache comes with this Q/DQ ONNX" in "\n".join(rep.lines())
    # with the cache written from its scales (beside the ONNX, where the pipeline puts it) it builds
    from kdtoolkit.backends.trt.calib_cache import write_calibration_cache_from_qdq

    onnx.save(m, str(tmp_path / "model.onnx"))
    write_calibration_cache_from_qdq(tmp_path / "model.onnx", tmp_path / "calibration.cache")
    rep = check_file(tmp_path / "model.onnx", DLA)
    assert rep.ok and ("dla.qdq", "") in rules(rep, "info"), rep.lines()
    # from TensorRT 11.4.1 DLA is strongly typed: the Q/DQ ONNX itself is right
    assert "dla.qdq" not in {r for r, _ in rules(check_model(m, DLA, tensorrt_version="11.4.1"))}


def test_dla_versions_without_jetson_dla_are_errors():
    m = _conv_relu(x_shape=(1, 3, 16, 16))
    for v in ("10.8", "11.0", "11.4.0"):
        assert ("dla.version", "") in rules(check_model(m, DLA, tensorrt_version=v), "error"), v
    assert "dla.version" not in {r for r, _ in rules(check_model(m, DLA, tensorrt_version="10.3"))}


def test_a_bad_calibration_cache_is_an_error(tmp_path):
    m = _qdq_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    (tmp_path / "c.cache").write_text("not a cache\n")
    assert ("calibration-cache", "") in rules(check_model(m, DLA, calib_cache=tmp_path / "c.cache"), "error")


def test_int8_without_qdq_on_strongly_typed_tensorrt_is_an_error():
    assert ("int8.route", "") in rules(check_model(_conv_relu(), ORIN, tensorrt_version="11.0"), "error")


@pytest.mark.parametrize("op,version,ok", [
    # rows of onnx-tensorrt docs/operators.md per release branch
    ("Hardmax", "8.5", False), ("Hardmax", "8.6", False), ("Hardmax", "9.2", True), ("Hardmax", "10.0", True),
    ("GroupNormalization", "8.5", False), ("GroupNormalization", "8.6", True), ("GroupNormalization", "10.3", True),
    ("LayerNormalization", "8.5", False), ("LayerNormalization", "8.6", True), ("IsInf", "8.6", True),
    ("CastLike", "9.0", False), ("CastLike", "9.1", True), ("Gelu", "8.6", False), ("Gelu", "10.0", True),
    ("DeformConv", "10.0", False), ("DeformConv", "10.1", True), ("Col2Im", "10.0", False), ("Col2Im", "10.13", False),
    ("Mod", "8.5", True), ("OneHot", "8.5", True), ("Unique", "10.1", False), ("Conv", "8.5", True),
])
def test_operator_table_follows_onnx_tensorrt_operators_md_per_release(op, version, ok):
    assert parser_supports(op, version) is ok


def test_hardmax_and_group_norm_versions_in_findings():
    nodes = [helper.make_node("Hardmax", ["x"], ["y"], name="hm", axis=1)]
    assert check_model(_model(nodes, []), ORIN, tensorrt_version="10.0").ok
    gn = [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], name="gn", num_groups=1)]
    inits = [numpy_helper.from_array(np.ones(3, np.float32), "s"), numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    m = _model(gn, inits, opset=18)
    prof = load_profile("desktop-gpu")
    assert ("unsupported-op", "gn") not in rules(check_model(m, prof, tensorrt_version="8.6"))
    rep = check_model(m, prof, tensorrt_version="8.5")
    assert ("unsupported-op", "gn") in rules(rep, "error") and "parsed from TensorRT 8.6" in "\n".join(rep.lines())


def test_ort_profile_only_checks_opset_and_its_own_scheme():
    rep = check_model(_qdq_model(act_zp=128, act_zp_dtype=np.uint8), load_profile("ort-cpu"))
    assert rep.ok and rep.tensorrt_version is None and [f.rule for f in rep.findings] == ["backend"]


def test_check_file_errors_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        check_file(tmp_path / "none.onnx", ORIN)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(InputError, match="not an ONNX model"):
        check_file(tmp_path / "junk.onnx", ORIN)


@pytest.fixture(scope="module")
def resnet20_onnx(tmp_path_factory) -> Path:
    """A real exported, simplified CIFAR ResNet-20 (the project's own exporter)."""
    import torch

    from kdtoolkit.export.onnx_export import export_onnx, simplify
    from kdtoolkit.models import zoo

    d = tmp_path_factory.mktemp("r20")
    torch.manual_seed(0)
    model = zoo.ARCHS.get("cifar_resnet20")(num_classes=10).eval()
    mp = pytest.MonkeyPatch()
    try:
        export_onnx(model, (1, 3, 32, 32), d / "raw.onnx")
    except InputError:
        # the TorchScript exporter trips over ShortcutA's dict extra_state on some torch builds; the
        # check is about the graph, which does not depend on that state
        mp.setattr(zoo.ShortcutA, "get_extra_state", torch.nn.Module.get_extra_state)
        export_onnx(model, (1, 3, 32, 32), d / "raw.onnx")
    finally:
        mp.undo()
    simplify(d / "raw.onnx", d / "model.onnx")
    return d / "model.onnx"


def test_exported_resnet20_is_clean_for_jetson_agx_orin(resnet20_onnx):
    rep = check_file(resnet20_onnx, ORIN)
    assert rep.errors == 0 and rules(rep) == [("int8.calibration", "")], rep.lines()  # FP32 ONNX, int8 profile
    dla = check_file(resnet20_onnx, DLA)
    assert dla.errors == 0  # GPU fallback is on: the Gemm head and the shortcut Pads fall back, with warnings
    assert {f.node for f in dla.findings if f.rule == "dla.fallback"} >= {"/linear/Gemm"}


def test_cli_check_clean_model_exits_0_and_writes_json(resnet20_onnx, tmp_path):
    r = run_cli("check", str(resnet20_onnx), "--profile", "desktop-gpu", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    assert "0 error(s), 0 warning(s)" in r.stdout
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["ok"] is True and data["findings"] == []


def test_cli_check_errors_exit_1_with_one_line_per_finding(tmp_path):
    p = tmp_path / "bad.onnx"
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Hardmax", ["c"], ["y"], name="hm")]
    onnx.save(_model(nodes, [_w()], opset=18), str(p))
    r = run_cli("check", str(p), "--profile", "jetson-agx-orin", "--json", str(tmp_path / "f.json"))
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("error: [opset] <graph>: opset 18 is newer")
    assert lines[1].startswith("error: [unsupported-op] hm: Hardmax")
    assert "2 error(s)" in lines[-1]
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: 2 error-severity finding(s)")
    f = json.loads((tmp_path / "f.json").read_text())["findings"]
    assert {tuple(sorted(x)) for x in f} == {("message", "node", "rule", "severity")}
    assert run_cli("check", str(tmp_path / "missing.onnx"), "--profile", "jetson-agx-orin").returncode == 2


def test_cli_build_without_tensorrt_exits_3_with_the_install_hint(tmp_path):
    from kdtoolkit.backends.trt.lazy import load_tensorrt
    from kdtoolkit.errors import MissingDependency

    try:
        load_tensorrt()
        pytest.skip("TensorRT is installed here; the real build is tested in test_tensorrt_real.py")
    except MissingDependency:
        pass
    p = tmp_path / "m.onnx"
    onnx.save(_conv_relu(), str(p))
    r = run_cli("build", str(p), "--profile", "jetson-agx-orin", "--out", str(tmp_path / "eng"))
    assert r.returncode == 3, r.stderr
    assert "pip install 'kdtoolkit[tensorrt]'" in r.stderr and "docker/tensorrt-x86.Dockerfile" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "eng").exists()
    r = run_cli("build", str(p), "--profile", "ort-cpu", "--out", str(tmp_path / "eng"))
    assert r.returncode == 2 and "pick a tensorrt profile" in r.stderr


def test_cuda_adapter_without_a_gpu_is_a_clear_error(monkeypatch):
    from kdtoolkit.backends.trt import cuda_mem
    from kdtoolkit.errors import KdtError

    monkeypatch.setattr(cuda_mem, "_active", None)
    monkeypatch.setenv("KDTOOLKIT_CUDA_BACKEND", "nope")
    with pytest.raises(InputError, match="pycuda, cuda-python"):
        cuda_mem.backend()
    monkeypatch.delenv("KDTOOLKIT_CUDA_BACKEND")
    try:
        b = cuda_mem.backend()
    except KdtError as exc:  # no pycuda/cuda-python (exit 3) or no device (exit 1): one clear line either way
        assert exc.exit_code in (1, 3) and "\n" not in str(exc)
    else:
        buf = b.alloc(16)  # a GPU is present: the adapter must really work
        buf.free()


def test_offdevice_record_writes_check_counts_and_build_script(tmp_path):
    """What compress's optimize stage hands over for a TensorRT profile without TensorRT: no engine, a check and commands."""
    import shutil

    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.backends.check import record_tensorrt_check

    src = tmp_path / "m.onnx"
    onnx.save(_conv_relu(), str(src))
    with ArtifactWriter(tmp_path / "opt", kind="onnx", stage="optimize") as w:
        shutil.copyfile(src, w.path("model.onnx"))
        record_tensorrt_check(w, ORIN, calib_data="mnist-mini")
    art = w.artifact
    assert art.metrics["tensorrt_check"] == {"errors": 0, "warnings": 1, "tensorrt_version": "8.5"}
    assert json.loads(art.file("check.json").read_text())["ok"] is True
    script = art.file("build_on_device.sh").read_text()
    # issue 15.3: no --calib-data path of this machine, no --calib=FILE for a file that is not there, no --int8
    # with placeholder ranges; issue 15.4: workspace as a plain number (MiB)
    assert 'kdtoolkit build model.onnx --profile jetson-agx-orin --out engine --calib-data "${CALIB_DATA:?' in script
    assert "--calib-data mnist-mini" not in script and "--calib=" not in script and "--int8" not in script
    assert "--memPoolSize=workspace:2048 " in script and "2048M" not in script
    assert "--minShapes=x:1x3x16x16 --optShapes=x:1x3x16x16 --maxShapes=x:16x3x16x16 --fp16" in script
    assert "trtexec cannot calibrate from data" in script and "(the run calibrated from 'mnist-mini')" in script
    assert art.info["on_device_build"]["trtexec_precision"] == "fp16"
    assert "--builderOptimizationLevel" not in script  # trtexec 8.5 (the profile's oldest) has no such flag
    assert not list(art.path.glob("*.plan"))  # never pretends to have built an engine
    with ArtifactWriter(tmp_path / "dla", kind="onnx", stage="optimize") as w:
        onnx.save(_conv_relu(x_shape=(1, 3, 16, 16)), str(w.path("model.onnx")))
        record_tensorrt_check(w, DLA)
    assert "--useDLACore=0 --allowGPUFallback" in w.artifact.file("build_on_device.sh").read_text()


def _qdq_dla_model():
    m = _qdq_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    return m


def test_offdevice_record_for_dla_writes_a_calibration_cache_from_the_qdq_scales(tmp_path):
    """Issue 15.1: the DLA profile's Q/DQ output becomes buildable on TensorRT 8.5 .. 10.x: cache + Q/DQ-free ONNX + commands."""
    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.backends.check import record_tensorrt_check
    from kdtoolkit.backends.trt.calib_cache import read_calibration_cache

    with ArtifactWriter(tmp_path / "dla", kind="onnx", stage="optimize") as w:
        onnx.save(_qdq_dla_model(), str(w.path("model.onnx")))
        rep = record_tensorrt_check(w, DLA, calib_data="/home/someone/data")
    art = w.artifact
    assert rep.ok and {"calibration.cache", "model_noqdq.onnx"} <= set(art.manifest.files)
    header, scales = read_calibration_cache(art.file("calibration.cache"))
    assert header == "TRT-8500-EntropyCalibration2" and scales == {"x": pytest.approx(0.05)}
    script = art.file("build_on_device.sh").read_text()
    assert "kdtoolkit build model.onnx --profile jetson-agx-orin-dla --out engine --calib-cache calibration.cache" in script
    assert "--onnx=model_noqdq.onnx" in script and "--fp16 --int8 --calib=calibration.cache --useDLACore=0" in script
    assert "[ -f calibration.cache ] ||" in script and "/home/someone" not in script
    assert art.info["calibration_cache"]["activation_scales"] == 1


def test_build_commands_never_ask_trtexec_for_int8_it_cannot_get(tmp_path):
    """Issue 15.2: auto without Q/DQ is FP16 (no --int8); int8 on a GPU adds --fp16 like kdtoolkit build does."""
    from kdtoolkit.backends.trt.commands import build_commands

    onnx.save(_conv_relu(), str(tmp_path / "fp32.onnx"))
    onnx.save(_qdq_model(), str(tmp_path / "qdq.onnx"))
    gpu = load_profile("desktop-gpu")  # precision auto
    c = build_commands(tmp_path / "fp32.onnx", gpu)
    assert "--fp16" in c["trtexec"] and "--int8" not in c["trtexec"] and c["precision"] == "fp16"
    c = build_commands(tmp_path / "qdq.onnx", gpu)
    assert "--fp16 --int8" in c["trtexec"] and "--calib" not in c["trtexec"] and "--calib" not in c["kdtoolkit"]
    c = build_commands(tmp_path / "qdq.onnx", ORIN)
    assert "--fp16 --int8" in c["trtexec"] and c["implicit_int8"] == "False"
    (tmp_path / "calibration.cache").write_text("TRT-8500-EntropyCalibration2\nx: 3d4ccccd\n")
    c = build_commands(tmp_path / "fp32.onnx", ORIN, calib_cache_name="calibration.cache")
    assert "--fp16 --int8 --calib=calibration.cache" in c["trtexec"] and "--calib-cache calibration.cache" in c["kdtoolkit"]


def test_the_projects_own_tensorrt_qdq_passes_and_its_ort_qdq_does_not(resnet20_onnx, tmp_path):
    """The quantizer's TensorRT-scheme QDQ model has no error under the check; its ort_x86 one (u8 activations) is refused."""
    from kdtoolkit.quant import ptq as quant  # our own module: a broken import must fail, not skip
    from kdtoolkit.quant.schemes import scheme_for

    calib = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    quant.quantize_onnx(resnet20_onnx, tmp_path / "trt.onnx", calib, scheme_for(ORIN))
    rep = check_file(tmp_path / "trt.onnx", ORIN)
    assert rep.errors == 0, rep.lines()
    quant.quantize_onnx(resnet20_onnx, tmp_path / "ort.onnx", calib, scheme_for(load_profile("ort-cpu"), reduce_range=False))
    assert {"qdq.dtype", "qdq.zero_point"} & {f.rule for f in check_file(tmp_path / "ort.onnx", ORIN).findings if f.severity == "error"}
