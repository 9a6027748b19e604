import pickle

import pytest
import torch
from conftest import shared_file

from kdtoolkit.errors import InputError
from kdtoolkit.models import build_arch, load_model
from kdtoolkit.models.loading import save_checkpoint


def test_shared_resnet56_state_dict_with_module_prefix():
    path = shared_file("weights/resnet56-cifar10.th")
    m = load_model(path, arch="cifar_resnet56")
    assert m.form == "eager" and m.arch == "cifar_resnet56"
    assert sum(p.numel() for p in m.module.parameters()) == 853018
    assert m.meta["best_prec1"] == pytest.approx(93.62)
    assert m.module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_wrong_arch_names_the_keys():
    path = shared_file("weights/resnet56-cifar10.th")
    with pytest.raises(InputError, match=r"unexpected keys: layer1\.3\.conv1\.weight"):
        load_model(path, arch="cifar_resnet20")


def test_unknown_arch_lists_known_and_state_dict_needs_arch(tmp_path):
    torch.save(build_arch("cifar_resnet20").state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InputError, match="known: .*cifar_resnet56"):
        load_model(tmp_path / "sd.pt", arch="resnet9000")
    with pytest.raises(InputError, match="--arch"):
        load_model(tmp_path / "sd.pt")
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "missing.pt", arch="cifar_resnet20")


def test_torchscript_and_exported_program(tmp_path):
    m = build_arch("cifar_resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    torch.jit.save(torch.jit.trace(m, x), tmp_path / "ts.pt")
    ts = load_model(tmp_path / "ts.pt")
    assert ts.form == "torchscript" and not ts.rewritable
    torch.testing.assert_close(ts.module(x), m(x))
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "m.pt2")
    ep = load_model(tmp_path / "m.pt2")
    # an exported program is rebuilt as a module tree: it evaluates, trains and can be rewritten
    assert ep.form == "exported" and ep.rewritable
    torch.testing.assert_close(ep.module(x), m(x))
    ep.module.train()
    ep.module.eval()


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    _Evil.marker = marker
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": evil}, fh)
    torch.save({"model": evil}, tmp_path / "evil2.pt")
    for f in ("evil.pt", "evil2.pt"):
        with pytest.raises(InputError, match="--trust-pickle"):
            load_model(tmp_path / f, arch="cifar_resnet20")
    assert not marker.exists()


def test_full_module_pickle_needs_trust(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    m(torch.zeros(1, 3, 8, 8))
    torch.save(m, tmp_path / "full.pt")
    with pytest.raises(InputError, match="arbitrary code"):
        load_model(tmp_path / "full.pt")
    loaded = load_model(tmp_path / "full.pt", trust_pickle=True)
    assert loaded.form == "pickle" and loaded.module(torch.zeros(1, 3, 8, 8)).shape == (1, 10)


def test_kdtoolkit_checkpoint_rebuilds_student_without_teacher_code(tmp_path):
    from kdtoolkit.student.transforms import reduce_depth, to_separable

    m = build_arch("cifar_resnet20", num_classes=7)
    reduce_depth(m, {"layer2": 1})
    to_separable(m)
    recipe = {"arch": "cifar_resnet20", "arch_kwargs": {"num_classes": 7},
              "transforms": [{"op": "depth", "keep": {"layer2": 1}}, {"op": "separable", "skip_stem": True}]}
    save_checkpoint(tmp_path / "s.pt", m, recipe, {"classes": list("abcdefg")})
    # weights_only loading works: no code is unpickled
    assert torch.load(tmp_path / "s.pt", weights_only=True)["format"] == "kdtoolkit.model/1"
    back = load_model(tmp_path / "s.pt")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(back.module(x), m.eval()(x))
    assert back.meta["classes"] == list("abcdefg")


def test_not_a_torch_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a loadable PyTorch file|contains pickled"):
        load_model(tmp_path / "junk.pt", arch="cifar_resnet20")


def test_an_onnx_file_or_a_truncated_checkpoint_is_named_for_what_it_is(tmp_path):
    from kdtoolkit.models.zoo import small_cnn

    m = small_cnn(num_classes=10, in_channels=1)
    torch.onnx.export(m.eval(), (torch.zeros(1, 1, 28, 28),), str(tmp_path / "m.onnx"), dynamo=False)
    with pytest.raises(InputError, match=r"m\.onnx is an ONNX model; this needs the PyTorch model it came from"):
        load_model(tmp_path / "m.onnx", trust_pickle=True)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:3000])
    with pytest.raises(InputError, match="not a loadable PyTorch file: truncated, or not a model saved with torch.save"):
        load_model(tmp_path / "cut.pt", arch="small_cnn")
