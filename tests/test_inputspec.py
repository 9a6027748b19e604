"""The one resolution order for input size and normalisation: flags, model metadata, zoo entry, data."""

import io

import numpy as np
import pytest
import torch

from kdtoolkit.cli.options import parse_input_flags
from kdtoolkit.data.inputspec import InputFlags, InputSpec, load_splits, note_measured, resolve_input
from kdtoolkit.errors import InputError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _npz(path, n=60, size=(10, 12), channels=3, classes=3, value=None):
    rng = np.random.default_rng(0)
    shape = (n, *size, channels) if channels > 1 else (n, *size)
    x = rng.integers(0, 255, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(n) % classes, x_test=x[:12], y_test=np.arange(12) % classes)
    return str(path)


def test_each_field_comes_from_the_first_source_that_has_it():
    meta = {"input_size": [28, 28], "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.3, 0.3]}
    spec = resolve_input(InputFlags(std=(0.5, 0.5, 0.5)), meta, "cifar_resnet20")
    assert spec.input_size == (28, 28) and spec.source["input_size"] == "model"  # metadata beats the zoo's 32x32
    assert spec.channels == 3 and spec.source["channels"] == "zoo cifar_resnet20"
    assert spec.mean == (0.1, 0.2, 0.3) and spec.source["mean"] == "model"
    assert spec.std == (0.5, 0.5, 0.5) and spec.source["std"] == "flag"
    # nothing but the zoo: every cifar_* model is 3x32x32, and the zoo knows no normalisation
    z = resolve_input(None, {}, "cifar_resnet56")
    assert z.shape == (3, 32, 32) and z.mean is None and z.std is None
    # small_cnn fixes no size (28x28 to 64x64); its channels come from its weights' first conv
    from kdtoolkit.models import build_arch

    s = resolve_input(None, {}, "small_cnn", module=build_arch("small_cnn", in_channels=3))
    assert s.channels == 3 and s.source["channels"] == "model" and s.input_size is None


def test_torchvision_arch_gives_imagenet_normalisation_but_not_the_size_of_a_pooled_cnn():
    pytest.importorskip("torchvision")
    r18 = resolve_input(None, {}, "torchvision:resnet18")
    assert (r18.mean, r18.std) == IMAGENET and r18.source["mean"] == "torchvision resnet18 weights"
    assert r18.input_size is None  # the data's size wins over a 224x224 default
    assert r18.require_shape() == (3, 224, 224) and "default size" in r18.source["input_size"]  # only without data
    vit = resolve_input(None, {}, "torchvision:vit_b_16")
    assert vit.shape == (3, 224, 224)  # a ViT accepts only its own size


def test_load_splits_fills_only_what_nothing_else_gave(tmp_path):
    src = _npz(tmp_path / "d.npz")
    sp = load_splits(src, resolve_input(None, {"mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b", "c"]}, "cifar_resnet8"),
                     note=False)
    assert sp.train.x.shape[1:] == (32, 32, 3)  # the zoo's size, not the data's 10x12
    assert sp.spec.mean == (0.5, 0.5, 0.5) and sp.input.source["mean"] == "model"
    assert sp.spec.classes == ["a", "b", "c"] and sp.input.source["classes"] == "model"
    sp = load_splits(src, resolve_input(None, {}, None), note=False)
    assert sp.input.input_size == (10, 12) and sp.input.source["input_size"] == "data" and sp.input.source["mean"] == "data"
    assert sp.input.classes == ["0", "1", "2"]
    # a torchvision default size never resizes the data
    pytest.importorskip("torchvision")
    sp = load_splits(src, resolve_input(None, {}, "torchvision:resnet18"), note=False)
    assert sp.input.input_size == (10, 12) and sp.spec.mean == IMAGENET[0]


def test_one_note_exactly_when_the_normalisation_is_measured(tmp_path, capsys):
    src = _npz(tmp_path / "d.npz")
    load_splits(src, resolve_input(None, {}, None))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: normalisation measured from the data (mean ") and "--mean/--std" in err[0]
    load_splits(src, resolve_input(InputFlags(mean=(0.5,) * 3, std=(0.2,) * 3), {}, None))
    assert capsys.readouterr().err == ""
    buf = io.StringIO()
    assert note_measured(InputSpec(mean=(0.1,), std=(0.2,), source={"mean": "model", "std": "model"}), stream=buf) is None
    assert buf.getvalue() == ""


def test_to_meta_does_not_pass_measured_statistics_on_as_the_models_own():
    spec = InputSpec(channels=3, input_size=(32, 32), mean=(0.4,) * 3, std=(0.2,) * 3,
                     source={"channels": "zoo x", "input_size": "zoo x", "mean": "data", "std": "data"})
    assert "mean" not in spec.to_meta(include_measured=False) and spec.to_meta(include_measured=False)["input_size"] == [32, 32]
    full = spec.to_meta()
    assert full["mean"] == [0.4] * 3 and full["input_source"]["mean"] == "data"


def test_one_size_is_a_square_input():
    f = parse_input_flags(input_shape="64")
    assert f.input_size == (64, 64) and f.channels is None


@pytest.mark.parametrize("kwargs,needle", [
    ({"input_shape": "3,32,32", "mean": "0.5,0.5"}, "--mean has 2 value(s) but the input has 3 channel(s)"),
    ({"input_shape": "3,32"}, None),  # H,W is the --input-size alias: fine
    ({"input_shape": "1,2,3,4"}, "--input-shape must be C,H,W, H,W or one size S for S,S"),
    ({"input_shape": "3,0,32"}, "--input-shape values must be positive"),
    ({"input_shape": "3,a,32"}, "--input-shape must be comma-separated integers"),
    ({"input_shape": "3,32,32", "channels": 1}, "--channels 1 contradicts --input-shape"),
    ({"std": "0.2,0,0.2"}, "--std values must be positive"),
    ({"mean": "0.5,0.5,0.5", "std": "0.2,0.2"}, "--mean has 3 value(s) but --std has 2"),
    ({"mean": "0.5;0.5"}, "--mean must be comma-separated numbers"),
])
def test_flag_errors_name_the_flag(kwargs, needle):
    if needle is None:
        f = parse_input_flags(**kwargs)
        assert f.input_size == (3, 32) and f.channels is None
        return
    with pytest.raises(InputError) as e:
        parse_input_flags(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_contradictions_with_the_model_name_the_flag():
    meta = {"channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3}
    with pytest.raises(InputError, match=r"^--mean has 1 value\(s\) but the model input has 3 channel\(s\) \(from the model's metadata\)"):
        resolve_input(InputFlags(mean=(0.5,)), meta, None)
    with pytest.raises(InputError, match="give --mean and --std with 1 values each"):
        resolve_input(InputFlags(channels=1, input_size=(28, 28)), meta, None)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match="--input-shape gives 1 channel.* first convolution takes 3"):
        resolve_input(InputFlags(channels=1), {}, None, module=conv)


def test_flag_mean_checked_against_the_datas_channels_when_nothing_else_knows_them(tmp_path):
    src = _npz(tmp_path / "g.npz", channels=1)
    with pytest.raises(InputError, match=r"--mean has 3 value\(s\) but the model input has 1 channel\(s\) \(from the data\)"):
        load_splits(src, resolve_input(InputFlags(mean=(0.5,) * 3, std=(0.2,) * 3), {}, None), note=False)


def test_class_count_mismatch_is_one_line(tmp_path):
    src = _npz(tmp_path / "d.npz")
    with pytest.raises(InputError, match="the model has 10 outputs \\(classes in its metadata\\) but the data has 3 classes"):
        load_splits(src, resolve_input(None, {"classes": [str(i) for i in range(10)]}, None), note=False)
    with pytest.raises(InputError, match="--class-names gives 2 names but the data has 3 classes"):
        load_splits(src, resolve_input(InputFlags(classes=["a", "b"]), {}, None), note=False)
