"""ONNX export against PyTorch: the parity check (library and `kdtoolkit export`) must report real numbers
and catch an export of the wrong model; converted students must compute the same logits in ONNX Runtime.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli
from helpers import class_pixel_images, make_splits, save_npz
from torch import nn

from kdtoolkit.export.onnx_export import export_onnx, parity
from kdtoolkit.models.zoo import small_cnn


def _ort(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()


def _rolled(model: nn.Module) -> nn.Module:
    """The same network with its logits rotated by one class: top-1 never agrees with the original."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.classifier.weight.copy_(model.classifier.weight.roll(-1, 0))
        m.classifier.bias.copy_(model.classifier.bias.roll(-1, 0) + 1.0)
    return m


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")

    def part(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 4
        return class_pixel_images(y, 8, seed), y

    splits = make_splits(part(48, 0), part(8, 1), part(24, 2), 4)
    torch.manual_seed(0)
    model = small_cnn(4, 1, 0.25).eval()
    good = export_onnx(model, (1, 1, 8, 8), d / "good.onnx")
    wrong = export_onnx(_rolled(model), (1, 1, 8, 8), d / "wrong.onnx")
    from kdtoolkit.data.datasets import to_tensor

    x_test = to_tensor(splits.test.x, splits.spec).numpy()
    return {"dir": d, "splits": splits, "model": model, "good": good, "wrong": wrong, "x_test": x_test}


def test_parity_of_a_faithful_export_is_exact_on_every_test_image(case) -> None:
    sp = case["splits"]
    r = parity(case["model"], case["good"], sp.test, sp.spec)
    assert r["n"] == len(sp.test) == 24
    assert r["top1_agreement"] == 1.0
    assert 0.0 <= r["max_abs_diff"] < 1e-4
    # and the number is the real max |torch - ORT| over those images
    want = float(np.abs(_torch(case["model"], case["x_test"]) - _ort(case["good"], case["x_test"])).max())
    assert r["max_abs_diff"] == pytest.approx(want, abs=1e-7)
    assert parity(case["model"], case["good"], sp.test, sp.spec, limit=5)["n"] == 5


def test_parity_catches_an_onnx_file_of_another_model(case) -> None:
    sp = case["splits"]
    r = parity(case["model"], case["wrong"], sp.test, sp.spec)
    ref, got = _torch(case["model"], case["x_test"]), _ort(case["wrong"], case["x_test"])
    assert (ref.argmax(1) != got.argmax(1)).all()  # the rolled head never agrees (the premise)
    assert r["top1_agreement"] == 0.0
    assert r["max_abs_diff"] == pytest.approx(float(np.abs(ref - got).max()), rel=1e-5)
    assert r["max_abs_diff"] > 0.5


def _checkpoint_and_data(case) -> tuple:
    from kdtoolkit.models.loading import save_checkpoint

    d = case["dir"]
    ck = d / "model.pt"
    recipe = {"arch": "small_cnn", "arch_kwargs": {"num_classes": 4, "in_channels": 1, "width": 0.25}, "transforms": []}
    save_checkpoint(ck, case["model"], recipe, case["splits"].spec.to_dict())
    return ck, save_npz(d / "data.npz", case["splits"])


def test_parity_reported_by_the_export_command(case, tmp_path) -> None:
    ck, data = _checkpoint_and_data(case)
    out = tmp_path / "e"
    r = run_cli("export", str(ck), "--out", str(out), "--data", str(data), "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    p = json.loads((tmp_path / "r.json").read_text())["parity"]
    assert p["n"] == len(case["splits"].test) and p["top1_agreement"] == 1.0 and p["max_abs_diff"] < 1e-4
    assert f"parity on {p['n']} test images" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["parity"] == p
    # the exported file is the one parity ran on: ORT on it against torch gives the same figure
    want = float(np.abs(_torch(case["model"], case["x_test"]) - _ort(out / "model.onnx", case["x_test"])).max())
    assert p["max_abs_diff"] == pytest.approx(want, abs=1e-7)


def test_parity_of_the_export_command_catches_a_broken_export(case, tmp_path, monkeypatch, capsys) -> None:
    """`kdtoolkit export` in-process with its simplifier swapped for one that writes another model's graph:
    the command must report the broken file's real disagreement, not a stale or assumed figure."""
    import kdtoolkit.export.onnx_export as ox

    ck, data = _checkpoint_and_data(case)
    original = ox.simplify
    wrong_bytes = case["wrong"].read_bytes()

    def broken_simplify(src, dst):
        info = original(src, dst)
        with open(dst, "wb") as fh:
            fh.write(wrong_bytes)
        return info

    for name, mod in list(sys.modules.items()):  # wherever the command imports it from
        if name.startswith("kdtoolkit") and getattr(mod, "simplify", None) is original:
            monkeypatch.setattr(mod, "simplify", broken_simplify)
    from kdtoolkit.cli import main

    out = tmp_path / "e"
    monkeypatch.setattr(sys, "argv", ["kdtoolkit", "export", str(ck), "--out", str(out), "--data", str(data),
                                      "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit) as ei:
        main()
    assert ei.value.code in (0, None), capsys.readouterr().err
    p = json.loads((tmp_path / "r.json").read_text())["parity"]
    assert (out / "model.onnx").read_bytes() == wrong_bytes
    assert p["top1_agreement"] == 0.0
    want = float(np.abs(_torch(case["model"], case["x_test"]) - _ort(case["wrong"], case["x_test"])).max())
    assert p["max_abs_diff"] == pytest.approx(want, rel=1e-5) and p["max_abs_diff"] > 0.5


# -- converted students compute the same logits in ONNX Runtime ------------------------------------
# These replace the shape-only comparisons in tests/test_student_models.py
# (test_torchvision_resnet18_width_shrink_keeps_residuals_consistent, test_grouped_dilated_se_and_bias).
def _compare(model: nn.Module, shape: tuple[int, ...], tmp_path, seed: int = 0) -> None:
    x = np.random.default_rng(seed).standard_normal((4, *shape[1:])).astype(np.float32)
    path = export_onnx(model.eval(), shape, tmp_path / "m.onnx")
    ref, got = _torch(model, x), _ort(path, x)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert np.abs(ref).max() > 1e-3  # not a trivially zero network


def test_onnx_matches_torch_after_resnet18_width_shrink(tmp_path) -> None:
    pytest.importorskip("torchvision", reason="torchvision imports only beside a matching torch (see README)")
    from kdtoolkit.models import build_arch
    from kdtoolkit.student.shrink import shrink_width

    torch.manual_seed(0)
    m = build_arch("torchvision:resnet18", num_classes=10).eval()
    shrink_width(m, torch.zeros(1, 3, 32, 32), 0.5, round_to=8)
    with torch.no_grad():  # BatchNorm statistics that make the residual sums matter, not identity BNs
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.uniform_(-0.2, 0.2)
                b.running_var.uniform_(0.5, 1.5)
    _compare(m, (1, 3, 32, 32), tmp_path)


def test_onnx_matches_torch_for_a_separable_grouped_dilated_se_model(tmp_path) -> None:
    from test_student_models import Odd

    from kdtoolkit.student.transforms import to_separable

    torch.manual_seed(0)
    m = Odd().eval()
    info = to_separable(m)
    assert info["converted"] == ["dilated", "strided"]
    _compare(m, (1, 3, 20, 20), tmp_path)
