"""INT8: schemes, PTQ, QAT fake-quant parity with ORT, BN folding, sensitivity fallback, precision policy, CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def mnist():
    from kdtoolkit.data import load_data

    return load_data("mnist-mini", train_limit=3000, test_limit=1000)


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """A small CNN trained briefly on mnist-mini, and its FP32 ONNX export."""
    from kdtoolkit.distill.trainer import LossConfig, TrainConfig, Trainer
    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.zoo import small_cnn

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("quant")
    m = small_cnn(10, 1, width=0.25)
    cfg = TrainConfig(epochs=2, max_steps=60, batch_size=64, lr=0.01, optimizer="adamw", weight_decay=0.0, loss=LossConfig(name="ce"))
    model = Trainer(cfg, d / "work", progress=False).fit(m, mnist)["model"].eval()
    onnx_path = export_onnx(model, (1, 1, 28, 28), d / "fp32.onnx")
    return model, onnx_path, d


def _scheme(name: str, reduce_range: bool = False):
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    prof = load_profile({"tensorrt": "jetson-agx-orin", "ort_x86": "ort-cpu"}[name])
    return scheme_for(prof, reduce_range=reduce_range)


def _acc(path, data, spec) -> float:
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.evaluate import evaluate

    return evaluate(make_session(path), data, spec)["accuracy"]


def test_ptq_gives_valid_qdq_onnx_near_fp32(trained, mnist):
    import onnx

    from kdtoolkit.quant.ptq import calib_array, quantize_onnx

    _, fp32, d = trained
    out = d / "int8.onnx"
    info = quantize_onnx(fp32, out, calib_array(mnist, 128), _scheme("ort_x86", reduce_range=True), method="minmax")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    a32, a8 = _acc(fp32, mnist.test, mnist.spec), _acc(out, mnist.test, mnist.spec)
    assert a32 > 0.5
    assert abs(a32 - a8) <= 0.03
    assert info["scheme"]["reduce_range"] is True and info["scheme"]["weight_range"] == [-64, 64]


@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_other_calibrations_run(trained, mnist, method):
    from kdtoolkit.quant.ptq import calib_array, quantize_onnx

    _, fp32, d = trained
    out = d / f"int8_{method}.onnx"
    quantize_onnx(fp32, out, calib_array(mnist, 64), _scheme("ort_x86"), method=method)
    assert abs(_acc(fp32, mnist.test, mnist.spec) - _acc(out, mnist.test, mnist.spec)) <= 0.05


def test_mse_range_clips_outliers():
    from kdtoolkit.quant.ptq import mse_range, qdq_error

    s = _scheme("ort_x86")
    v = np.concatenate([np.random.default_rng(0).normal(0, 1, 100_000), [200.0]]).astype(np.float32)
    lo, hi = mse_range(v, s)
    assert hi < 200.0
    assert qdq_error(v, s, lo, hi) < qdq_error(v, s, float(v.min()), float(v.max()))


def _rule_errors(path) -> list[str]:
    import onnx

    from kdtoolkit.quant.qdq_rules import qdq_findings

    return [f.line() for f in qdq_findings(onnx.load(str(path)), "tensorrt") if f.severity == "error"]


def test_tensorrt_scheme_zero_points_and_per_channel_weights(trained, mnist):
    import onnx
    from onnx import numpy_helper

    from kdtoolkit.quant.ptq import calib_array, quantize_onnx
    from kdtoolkit.quant.qat import calibrate, export_qdq, prepare_qat

    model, fp32, d = trained
    sch = _scheme("tensorrt")
    x = calib_array(mnist, 64)
    ptq = d / "trt_ptq.onnx"
    quantize_onnx(fp32, ptq, x, sch, method="minmax")
    gm = prepare_qat(model, sch)
    calibrate(gm, x, sch, method="minmax")
    qat = d / "trt_qat.onnx"
    export_qdq(gm, (1, 1, 28, 28), qat)
    for path in (ptq, qat):
        assert _rule_errors(path) == []
        m = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        prod = {o: n for n in m.graph.node for o in n.output}
        for n in m.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
                assert not inits[n.input[2]].any(), f"{path.name}: {n.name} has a non-zero zero point"
            if n.op_type == "Conv":
                dq = prod[n.input[1]]
                assert dq.op_type == "DequantizeLinear"
                out_ch = inits[dq.input[0]].shape[0]
                assert inits[dq.input[1]].shape == (out_ch,), "weight scales must be per output channel"


def test_fake_quant_matches_ort_qdq_within_one_step(mnist, tmp_path):
    """Torch fake-quant and the exported QDQ graph on ORT agree to within one quantisation step."""
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.quant.ptq import calib_array
    from kdtoolkit.quant.qat import act_quantizers, calibrate, export_qdq, prepare_qat

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    for name in ("ort_x86", "tensorrt"):
        sch = _scheme(name, reduce_range=True) if name == "ort_x86" else _scheme(name)
        gm = prepare_qat(model, sch)
        x = calib_array(mnist, 64)
        calibrate(gm, x, sch, method="minmax")
        out = tmp_path / f"{name}.onnx"
        export_qdq(gm, (1, 1, 28, 28), out)
        with torch.no_grad():
            ref = gm(torch.from_numpy(x)).numpy()
        got = make_session(out).run(None, {"input": x})[0]
        # the last conv's input is quantized: one step of each input element, times the weights it meets
        s_in = float(act_quantizers(gm)[-1].scale)
        w = gm.get_submodule("2").mod.weight.detach()
        wq = torch.fake_quantize_per_channel_affine(w, gm.get_submodule("2").weight_scale(), torch.zeros(4, dtype=torch.int32), 0, -128, 127)
        one_step = s_in * wq.abs().flatten(1).sum(1).max().item()
        diff = np.abs(ref - got).max()
        assert diff <= one_step, (name, diff, one_step)
        assert diff < 1e-3 * np.abs(ref).max() + one_step / 10  # in practice far below the bound


def test_bn_folding_is_exact():
    from kdtoolkit.models.zoo import ARCHS
    from kdtoolkit.quant.qat import fold_bn

    torch.manual_seed(0)
    m = ARCHS.get("cifar_resnet8")(num_classes=10, in_channels=3).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    f = fold_bn(m)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in f.modules())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(f(x), m(x), atol=1e-4, rtol=1e-4)


def test_sensitivity_fallback_floats_layers_until_it_fits(trained, mnist):
    import onnx

    from kdtoolkit.data.datasets import to_tensor
    from kdtoolkit.quant import sensitivity
    from kdtoolkit.quant.ptq import calib_array, quantize_onnx

    _, fp32, d = trained
    out = d / "sens.onnx"
    quantize_onnx(fp32, out, calib_array(mnist, 32), _scheme("ort_x86"), method="minmax")
    layers = sensitivity.quantized_layers(onnx.load(str(out)))
    assert len(layers) >= 4
    # all layers in float reproduces FP32
    allf = sensitivity.keep_in_float(onnx.load(str(out)), layers)
    vx, vy = to_tensor(mnist.val.x[:300], mnist.spec).numpy(), mnist.val.y[:300]
    from kdtoolkit.backends.ort import make_session

    p = d / "allf.onnx"
    onnx.save(allf, str(p))
    ref = make_session(fp32).run(None, {"input": vx})[0]
    d_float = np.abs(make_session(p).run(None, {"input": vx})[0] - ref).max()
    d_int8 = np.abs(make_session(out).run(None, {"input": vx})[0] - ref).max()
    assert d_float < d_int8 / 2  # pass-through ops (pooling) keep their Q/DQ; the layers themselves run in float
    # an impossible tolerance (negative) forces the full ranking and records it
    fp32_val = float((make_session(fp32).run(None, {"input": vx})[0].argmax(1) == vy).mean())
    _, rep = sensitivity.fallback(out, fp32_val + 0.5, vx, vy, 0.0, max_layers=2)
    assert rep["needed"] and len(rep["sensitivity"]) == len(layers) and len(rep["kept_in_float"]) == 2


def test_auto_picks_the_faster_precision_from_measured_numbers():
    from kdtoolkit.quant.schemes import pick_precision

    kw = dict(fp32_acc=0.90, tolerance_points=1.0, batch=1)
    p, why = pick_precision("auto", fp32_ms=1.0, int8_ms=1.3, int8_acc=0.899, **kw)
    assert p == "fp32" and "SLOWER" in why
    p, why = pick_precision("auto", fp32_ms=1.3, int8_ms=1.0, int8_acc=0.899, **kw)
    assert p == "int8" and "1.30x" in why
    p, why = pick_precision("auto", fp32_ms=1.02, int8_ms=1.0, int8_acc=0.899, **kw)
    assert p == "fp32" and "not clearly faster" in why  # a 2 % edge is noise: FP32 ships
    p, why = pick_precision("auto", fp32_ms=1.3, int8_ms=1.0, int8_acc=0.85, **kw)
    assert p == "fp32" and "tolerance" in why
    p, why = pick_precision("int8", fp32_ms=1.0, int8_ms=1.3, int8_acc=0.899, **kw)
    assert p == "int8" and "SLOWER" in why  # never shipped slower without saying so
    p, why = pick_precision("auto", fp32_ms=None, int8_ms=None, int8_acc=0.899, tensorrt=True, **kw)
    assert p == "int8" and "not measured" in why and "proxy" in why


def test_compress_quantize_stage_records_the_decision(tmp_path, trained):
    """The stage on a real (tiny) run: precision and reason recorded, the shipped model is the chosen one."""
    from kdtoolkit.artifact import Artifact
    from kdtoolkit.distill.trainer import TrainConfig
    from kdtoolkit.models.loading import save_checkpoint
    from kdtoolkit.pipeline import CompressConfig, DataConfig, MeasureConfig, compress
    from kdtoolkit.quant.qat import QatConfig
    from kdtoolkit.student.build import StudentConfig

    model, _, d = trained
    from kdtoolkit.data import load_data

    ck = tmp_path / "t.pt"
    save_checkpoint(ck, model, {"arch": "small_cnn", "arch_kwargs": {"num_classes": 10, "in_channels": 1, "width": 0.25}, "transforms": []},
                    load_data("mnist-mini").spec.to_dict())
    cfg = CompressConfig(model=str(ck), data=DataConfig(source="mnist-mini", train_limit=1000, test_limit=500), profile="ort-cpu",
                         student=StudentConfig(separable=True), train=TrainConfig(epochs=1, max_steps=5, batch_size=64),
                         qat=QatConfig(max_steps=5, batch_size=64), measure=MeasureConfig(batches=[1, 64], iters=5, warmup=2))
    summary = compress(cfg, tmp_path / "run", progress=False)  # the whole run must finish: no stage's error is swallowed
    q = Artifact.load(next((tmp_path / "run").glob("*-quantize")))
    assert summary["student"]["precision"] == q.metrics["precision"]
    m = q.metrics
    assert m["precision"] in ("fp32", "int8") and m["precision_reason"]
    assert set(m["int8_speedup"]) == {"1", "64"}
    assert "int8.onnx" in q.manifest.files and q.info["quantization"]["method"] == "qat"
    assert q.info["quantization"]["qat"]["bn_folded"] is True
    shipped = q.file("model.onnx").read_bytes()
    assert (shipped == q.file("int8.onnx").read_bytes()) == (m["precision"] == "int8")


def _bad_onnx(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"this is not a protobuf")
    return str(p)


def _rgb_onnx(tmp_path):
    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.zoo import ARCHS

    p = tmp_path / "rgb.onnx"
    export_onnx(ARCHS.get("cifar_resnet8")(num_classes=10, in_channels=3), (1, 3, 32, 32), p)
    return str(p)


@pytest.mark.parametrize("case,needle", [
    ("few", "at least 16"),
    ("many", "has only"),
    ("invalid", "not a valid ONNX model"),
    ("method", "--calib-method must be one of"),
])
def test_bad_input_one_line_exit_2(tmp_path, trained, case, needle):
    _, fp32, _ = trained
    model = {"invalid": lambda: _bad_onnx(tmp_path)}.get(case, lambda: str(fp32))()
    size = {"few": "4", "many": "100000"}.get(case, "32")
    method = "bogus" if case == "method" else "minmax"
    out = tmp_path / "out"
    r = run_cli("quantize", model, "--data", "mnist-mini", "--out", str(out), "--calib-size", size, "--calib-method", method)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]  # notes are not errors
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*")), "nothing half written"


def test_calibration_shape_mismatch_is_one_input_error(tmp_path):
    """The CLI now maps data to the model's input (front door), so the mismatch is checked at the API."""
    from kdtoolkit.errors import InputError
    from kdtoolkit.quant.ptq import check_calib_shape

    with pytest.raises(InputError, match="calibration data is 1x28x28 per sample but the model takes 3x32x32"):
        check_calib_shape(_rgb_onnx(tmp_path), (1, 28, 28))
