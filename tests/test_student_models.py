"""Surgery on real architectures: every converted model still exports to ONNX and runs in ONNX Runtime."""

import numpy as np
import pytest
import torch
from conftest import shared_file
from torch import nn

from kdtoolkit.export.onnx_export import export_onnx
from kdtoolkit.models import build_arch, load_model
from kdtoolkit.models.loading import load_weights
from kdtoolkit.student.shrink import shrink_width
from kdtoolkit.student.transforms import fit_to_state_dict, to_separable


def _ort_out(model, shape, tmp_path):
    import onnxruntime as ort

    path = export_onnx(model.eval(), shape, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return ref, got


@pytest.mark.parametrize("name,already_separable", [
    ("resnet18", False), ("resnet50", False), ("mobilenet_v2", True), ("mobilenet_v3_small", True),
    ("efficientnet_b0", True), ("regnet_x_400mf", True),
])
def test_torchvision_models_convert_and_export(name, already_separable, tmp_path):
    pytest.importorskip("torchvision", reason="torchvision imports only beside torch 2.14.1 here (see README)")
    from kdtoolkit.errors import InputError

    torch.manual_seed(0)
    m = build_arch(f"torchvision:{name}", num_classes=10).eval()
    if already_separable:
        # depthwise/grouped everywhere but the stem: nothing to do is said, not silently copied
        with pytest.raises(InputError, match="nothing to convert"):
            to_separable(m)
        info = to_separable(m, skip_stem=False)
        assert len(info["converted"]) == 1
    else:
        info = to_separable(m)
        assert len(info["converted"]) > 5
    left = [n for n, c in m.named_modules() if type(c) is nn.Conv2d and c.groups == 1 and max(c.kernel_size) > 1]
    assert len(left) <= 1  # at most the stem
    ref, got = _ort_out(m, (1, 3, 32, 32), tmp_path)
    assert got.shape == ref.shape == (2, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_torchvision_resnet18_width_shrink_keeps_residuals_consistent(tmp_path):
    pytest.importorskip("torchvision", reason="torchvision imports only beside torch 2.14.1 here (see README)")
    m = build_arch("torchvision:resnet18", num_classes=10).eval()
    info = shrink_width(m, torch.zeros(1, 3, 32, 32), 0.5, round_to=8)
    assert info["params_after"] < 0.35 * info["params_before"]
    assert all(c.out_channels % 8 == 0 for c in m.modules() if isinstance(c, nn.Conv2d))
    ref, got = _ort_out(m, (1, 3, 32, 32), tmp_path)
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)  # the shrunk residual net exports to the same function


class Odd(nn.Module):
    """Grouped, dilated, biased convs and a squeeze-excitation block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.dilated = nn.Conv2d(16, 24, 3, padding=2, dilation=2, bias=True)
        self.se_fc1 = nn.Conv2d(24, 6, 1)
        self.se_fc2 = nn.Conv2d(6, 24, 1)
        self.strided = nn.Conv2d(24, 32, 5, stride=2, padding=2, bias=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.stem(x))))
        x = torch.relu(self.dilated(x))
        s = torch.sigmoid(self.se_fc2(torch.relu(self.se_fc1(x.mean((2, 3), keepdim=True)))))
        x = torch.relu(self.strided(x * s))
        return self.head(x.mean((2, 3)))


def test_grouped_dilated_se_and_bias(tmp_path):
    torch.manual_seed(0)
    m = Odd().eval()
    x = torch.randn(2, 3, 20, 20)
    before = m(x)
    info = to_separable(m)
    assert info["converted"] == ["dilated", "strided"]  # grouped convs, 1x1 and the stem stay
    assert m.dilated.depthwise.dilation == (2, 2) and m.strided.depthwise.stride == (2, 2)
    assert m.strided.pointwise.bias is not None
    ref, got = _ort_out(m, (1, 3, 20, 20), tmp_path)
    assert got.shape == before.shape
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_cifar_resnet_shrunk_and_separable_rebuilds_and_exports(tmp_path):
    m = load_model(shared_file("weights/resnet20-cifar10.th"), arch="cifar_resnet20").module
    x = torch.randn(2, 3, 32, 32)
    info = shrink_width(m, x, 0.5, round_to=8)
    assert info["params_after"] < 0.3 * info["params_before"]
    assert m.layer3[0].bn2.num_features % 8 == 0
    to_separable(m)
    m2 = build_arch("cifar_resnet20")
    to_separable(m2)
    fit_to_state_dict(m2, m.state_dict())
    load_weights(m2, m.state_dict(), "shrunk")
    m.eval(), m2.eval()
    torch.testing.assert_close(m(x), m2(x))
    ref, got = _ort_out(m2, (1, 3, 32, 32), tmp_path)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
