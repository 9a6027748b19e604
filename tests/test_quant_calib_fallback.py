"""PTQ calibration methods and the sensitivity fallback inside ``build_int8``, on tiny models whose
answer is known: a calibration set with one outlier, and a network with one deliberately
ill-conditioned layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import class_pixel_images, make_splits
from onnx import numpy_helper
from torch import nn

from kdtoolkit.export.onnx_export import export_onnx
from kdtoolkit.quant.ptq import build_int8, quantize_onnx
from kdtoolkit.quant.schemes import Scheme

ORT_X86 = Scheme("ort_x86", "uint8", False, "int8", True, 0, False)  # what the ort-cpu profile asks for on a VNNI CPU


def _q_scales(path: Path) -> dict[str, float]:
    """{tensor quantized: scale} for every QuantizeLinear of a QDQ model."""
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in m.graph.node if n.op_type == "QuantizeLinear"}


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


# -- entropy calibration -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outlier_case(tmp_path_factory):
    """A conv net and 64 N(0, 1) calibration samples, one of which holds a single 500 (an outlier)."""
    d = tmp_path_factory.mktemp("entropy")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    fp32 = export_onnx(m, (1, 4, 6, 6), d / "fp32.onnx")
    x = np.random.default_rng(0).standard_normal((64, 4, 6, 6)).astype(np.float32)
    x[40, 1, 2, 2] = 500.0
    out = {}
    for method in ("minmax", "entropy"):
        info = quantize_onnx(fp32, d / f"{method}.onnx", x, ORT_X86, method=method)
        assert info["calib_method"] == method
        out[method] = d / f"{method}.onnx"
    clean = np.random.default_rng(1).standard_normal((32, 4, 6, 6)).astype(np.float32)
    return {"fp32": fp32, "x": x, "clean": clean, **out}


def test_entropy_calib_model_runs_and_minmax_covers_the_outlier(outlier_case) -> None:
    """The baseline the entropy tests compare with: min/max spans the outlier, (500 - min) / 255 for u8."""
    x = outlier_case["x"]
    scale_mm = _q_scales(outlier_case["minmax"])["input"]
    assert scale_mm == pytest.approx((500.0 - min(float(x.min()), 0.0)) / 255, rel=1e-6)
    ref = _ort(outlier_case["fp32"], outlier_case["clean"])
    for method in ("minmax", "entropy"):
        got = _ort(outlier_case[method], outlier_case["clean"])
        assert got.shape == ref.shape and np.isfinite(got).all()


# Entropy used to equal minmax (ORT's quantize_static builds its EntropyCalibrater with 128/128 bins), and then,
# with ORT's calibrator at 2048 bins, over-clipped: its KL window is centred on zero of a signed histogram. kdtoolkit
# now computes TensorRT's entropy threshold itself (quant/ptq.py entropy_threshold).


def test_entropy_calib_range_is_tighter_than_minmax_and_quantizes_typical_data_better(outlier_case) -> None:
    s_mm, s_ent = _q_scales(outlier_case["minmax"]), _q_scales(outlier_case["entropy"])
    assert s_ent["input"] < 0.25 * s_mm["input"], (s_ent["input"], s_mm["input"])
    ref = _ort(outlier_case["fp32"], outlier_case["clean"])
    err = {k: float(np.abs(_ort(outlier_case[k], outlier_case["clean"]) - ref).mean()) for k in ("minmax", "entropy")}
    assert err["entropy"] < 0.5 * err["minmax"], err


def test_entropy_threshold_follows_tensorrts_recipe() -> None:
    """Known answers of the KL search over a 2048-bin |x| histogram with 128 levels."""
    from kdtoolkit.quant.ptq import entropy_threshold

    rng = np.random.default_rng(0)
    u = rng.uniform(0, 1, 200_000)
    assert entropy_threshold(u) == pytest.approx(float(u.max()))  # nothing to clip: the full range
    # a ReLU output (half zeros): the zero spike must not decide the cut; ORT's signed window put it at 0.25-0.44 of max
    relu = np.maximum(rng.standard_normal(200_000), 0)
    assert 0.9 * relu.max() < entropy_threshold(relu) <= relu.max()
    # a sparse tail (0.1 % of the values spread up to 4x the bulk) is clipped at the bulk's edge
    tail = np.concatenate([u, rng.uniform(0, 4, 200)])
    assert entropy_threshold(tail) == pytest.approx(1.0, abs=0.01)
    # a few outliers 100x the data: the cut goes as low as the search allows, 128 of the 2048 bins
    out = np.concatenate([u, np.full(20, 100.0)])
    assert entropy_threshold(out) == pytest.approx(100.0 * 128 / 2048)
    assert entropy_threshold(np.zeros(10)) == 0.0
    # the sign is ignored (TensorRT's ranges are symmetric)
    assert entropy_threshold(-tail) == pytest.approx(entropy_threshold(tail))


# -- sensitivity fallback inside build_int8 --------------------------------------------------------
class IllConditioned(nn.Module):
    """Logits = pixels 0..3 (the class is the brightest of them), through two Gemms.

    fc1 copies the 16 pixels but amplifies pixel 15 by 1000; fc2 adds pixel 15 to the class-3 logit. Pixel 15
    is black except in one calibration image, so calibration sees a logit range of ~1000 and INT8 logits in
    steps of ~4 cannot tell 0.2 from 1: every logit rounds to 0 and top-1 collapses to one class. Only fc2
    in float (its output, the logits, unquantized) repairs it; fc1 in float changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(16))
            self.fc1.weight[15, 15] = 1000.0
            self.fc1.bias.zero_()
            self.fc2.weight.zero_()
            self.fc2.weight[:, :4] = torch.eye(4)
            self.fc2.weight[3, 15] = 1.0
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x.flatten(1)))


@pytest.fixture(scope="module")
def ill_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("fallback")

    def part(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 4
        return class_pixel_images(y, 4, seed), y

    train = part(64, 0)
    train[0][5, 3, 3] = 255  # the one calibration image with pixel 15 lit
    splits = make_splits(train, part(32, 1), part(32, 2), 4)
    fp32 = export_onnx(IllConditioned().eval(), (1, 1, 4, 4), d / "fp32.onnx")
    gemms = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2
    return {"splits": splits, "fp32": fp32, "fc1": gemms[0], "fc2": gemms[1], "dir": d}


def _weight_source(path: Path, node_name: str) -> str:
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    node = next(n for n in m.graph.node if n.name == node_name)
    src = prod.get(node.input[1])
    return src.op_type if src is not None else "initializer"


def test_int8_fallback_keeps_the_ill_conditioned_layer_in_float_and_reports_it(ill_case) -> None:
    out = ill_case["dir"] / "int8_fb.onnx"
    res = build_int8(ill_case["fp32"], out, ill_case["splits"], ORT_X86, calib_size=64, tolerance_points=1.0)
    m, fb = res["metrics"], res["info"]["fallback"]
    # INT8 alone collapses to one class (25 %); the fallback finds fc2, floats it alone, and gets FP32's 100 % back
    assert fb["needed"] is True and fb["int8_val_accuracy"] == pytest.approx(0.25)
    assert list(fb["sensitivity"]) == [ill_case["fc2"], ill_case["fc1"]]
    assert fb["sensitivity"][ill_case["fc2"]] == pytest.approx(0.75) and fb["sensitivity"][ill_case["fc1"]] == 0.0
    assert m["kept_in_float"] == fb["kept_in_float"] == [ill_case["fc2"]]
    assert fb["fits"] is True and fb["test_accuracy_before"] == pytest.approx(0.25)
    assert m["accuracy_fp32"] == 1.0 and m["accuracy_int8"] == 1.0 and m["accuracy_drop_points"] == 0.0
    assert "1 layer(s) kept in float" in fb["cost"]
    # the file written is the repaired one: fc2's weight is a float initializer, fc1 still reads a DequantizeLinear
    assert _weight_source(out, ill_case["fc2"]) == "initializer"
    assert _weight_source(out, ill_case["fc1"]) == "DequantizeLinear"
    from kdtoolkit.data.datasets import to_tensor

    test = ill_case["splits"].test
    pred = _ort(out, to_tensor(test.x, ill_case["splits"].spec).numpy()).argmax(1)
    assert (pred == test.y).all()


def test_int8_fallback_is_not_applied_within_tolerance(ill_case) -> None:
    """The control: with a tolerance the 75-point drop fits, nothing is floated and INT8's 25 % is reported."""
    out = ill_case["dir"] / "int8_nofb.onnx"
    res = build_int8(ill_case["fp32"], out, ill_case["splits"], ORT_X86, calib_size=64, tolerance_points=80.0)
    assert res["metrics"]["kept_in_float"] == [] and res["metrics"]["accuracy_int8"] == pytest.approx(0.25)
    assert _weight_source(out, ill_case["fc2"]) == "DequantizeLinear"
