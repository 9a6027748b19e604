"""Vision transformers as teachers (issue 17, item 1): timm ViT/DeiT state dicts, timm and Hugging Face folders,
and a user's own ViT class as pickle / TorchScript / torch.export, through load, evaluate, export and compress.

Tiny models only (28x28 grey mnist-mini, patch 4, dim 32-64, depth 2); nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

USERCODE = Path(__file__).parent / "usercode"
sys.path.insert(0, str(USERCODE))
import user_models  # noqa: E402

timm = pytest.importorskip("timm")


def _cli(*args: str, user_code: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    if user_code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(USERCODE), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "kdtoolkit", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _timm_vit(name: str = "vit_tiny_patch16_224", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=28, patch_size=4, in_chans=1, num_classes=10, **kw).eval()


def _hf_folder(path: Path, *, labels: bool = True) -> torch.nn.Module:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    kw = {"id2label": {i: f"digit{i}" for i in range(10)}, "label2id": {f"digit{i}": i for i in range(10)}} if labels else {}
    cfg = tf.ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10, **kw)
    m = tf.ViTForImageClassification(cfg).eval()
    m.save_pretrained(str(path))
    return m


def _one_line_error(r: subprocess.CompletedProcess, text: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-1500:]
    assert text in lines[0], lines[0]


# ---------------------------------------------------------------------------- timm state dicts


@pytest.mark.parametrize("name,suffix", [("vit_tiny_patch16_224", ".safetensors"), ("deit_tiny_patch16_224", ".th")])
def test_timm_state_dict_takes_img_size_patch_and_channels_from_its_weights(name, suffix, tmp_path):
    from kdtoolkit.models.loading import load_model, save_model

    model = _timm_vit(name)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "best_acc": 0.5}, path)
    loaded = load_model(path, arch=f"timm:{name}")  # timm's default for this name is 224x224, patch 16, 3 channels
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded.module(x), model(x))
    assert loaded.recipe["arch_kwargs"] == {"num_classes": 10, "in_chans": 1, "patch_size": 4, "img_size": [28, 28]}
    assert loaded.meta["input_size"] == [28, 28]
    # the recipe rebuilds it without the user's file (model.pt: recipe + weights)
    assert save_model(tmp_path, loaded.module, loaded.recipe, loaded.meta, (1, 1, 28, 28)) == "model.pt"
    torch.testing.assert_close(load_model(tmp_path / "model.pt").module(x), model(x))


def test_input_off_the_patch_grid_is_one_line_before_any_work(tmp_path):
    from kdtoolkit.errors import InputError
    from kdtoolkit.models.vit import check_input

    model = _timm_vit()
    with pytest.raises(InputError, match=r"input size 30x30 is not a multiple of the ViT's patch size 4x4"):
        check_input(model, (30, 30))
    with pytest.raises(InputError, match=r"position embedding is for 28x28 inputs \(7x7 patches of 4x4"):
        check_input(model, (32, 32))
    check_input(model, (28, 28))
    check_input(user_models.Plain(), (30, 30))  # not a ViT: nothing to say
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "exp"
    r = _cli("export", str(tmp_path / "w.pth"), "--arch", "timm:vit_tiny_patch16_224", "--input-shape", "1,30,30", "--out", str(out))
    _one_line_error(r, "not a multiple of the ViT's patch size 4x4")
    assert not out.exists()
    run = tmp_path / "run"
    r = _cli("compress", str(tmp_path / "w.pth"), "--arch", "timm:vit_tiny_patch16_224", "--no-student", "--data", "mnist-mini",
             "--input-shape", "1,30,30", "--out", str(run))
    _one_line_error(r, "not a multiple of the ViT's patch size 4x4")
    assert not run.exists() or not any(run.iterdir())


def test_vit_arch_names_are_recognised():
    from kdtoolkit.models.vit import is_vit_arch

    assert is_vit_arch("timm:vit_small_patch16_224") and is_vit_arch("timm:deit_tiny_patch16_224.fb_in1k")
    assert is_vit_arch("hf:ViTForImageClassification") and not is_vit_arch("timm:resnet18")


def test_transformer_shape_options_on_a_convnet_teacher_are_one_line_errors():
    from kdtoolkit.config import StudentConfig
    from kdtoolkit.errors import InputError
    from kdtoolkit.models.loading import LoadedModel, build_arch
    from kdtoolkit.student.build import make_student

    cnn = LoadedModel(build_arch("cifar_resnet20", num_classes=10), "eager", "mem", arch="cifar_resnet20",
                      recipe={"arch": "cifar_resnet20", "arch_kwargs": {"num_classes": 10}, "transforms": []})
    with pytest.raises(InputError, match=r"--blocks, --heads shape\(s\) a student cut from a vision transformer teacher; this teacher is not one"):
        make_student(cnn, StudentConfig(blocks=2, heads=1), input_shape=(1, 3, 32, 32), num_classes=10)
    with pytest.raises(InputError, match=r"--mlp-hidden .* --student-arch cifar_deit builds its own"):
        make_student(cnn, StudentConfig(arch="cifar_deit", mlp_hidden=64), input_shape=(1, 3, 32, 32), num_classes=10)


# ---------------------------------------------------------------------------- folders


def test_hf_folder_loads_offline_returns_logits_and_rebuilds_without_the_folder(tmp_path):
    import shutil

    from kdtoolkit.models.loading import load_model, save_model
    from kdtoolkit.models.vit import geometry

    ref = _hf_folder(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    x = torch.randn(2, 1, 28, 28)
    want = ref(pixel_values=x).logits
    torch.testing.assert_close(loaded.module(x), want)
    assert loaded.arch == "hf:ViTForImageClassification"
    assert loaded.meta["input_size"] == [28, 28] and loaded.meta["channels"] == 1
    assert loaded.meta["classes"] == [f"digit{i}" for i in range(10)]
    assert geometry(loaded.module)["patch"] == (4, 4)
    assert save_model(tmp_path / "art", loaded.module, loaded.recipe, loaded.meta, (1, 1, 28, 28)) == "model.pt"
    shutil.rmtree(tmp_path / "hf")  # later stages rebuild it from the recipe (config in it), not from the user's folder
    again = load_model(tmp_path / "art" / "model.pt")
    torch.testing.assert_close(again.module(x), want)


def test_timm_folder_loads_with_its_model_args_and_preprocessing(tmp_path):
    from timm.models import save_for_hf

    from kdtoolkit.models.loading import load_model

    model = _timm_vit("vit_tiny_patch16_224", embed_dim=32, depth=2, num_heads=2)
    save_for_hf(model, str(tmp_path / "t"), data_config={"mean": (0.1307,), "std": (0.3081,)}, safe_serialization=True)
    loaded = load_model(tmp_path / "t")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.module(x), model(x))
    assert loaded.arch == "timm:vit_tiny_patch16_224"
    assert loaded.meta["mean"] == pytest.approx([0.1307]) and loaded.meta["std"] == pytest.approx([0.3081])
    assert loaded.meta["input_size"] == [28, 28]
    assert loaded.recipe["arch_kwargs"]["embed_dim"] == 32


def test_bad_folders_are_one_line_errors(tmp_path):
    (tmp_path / "noweights").mkdir()
    _hf_folder(tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    r = _cli("export", str(tmp_path / "noweights"), "--out", str(tmp_path / "o1"))
    _one_line_error(r, "no weights beside config.json (expected model.safetensors or pytorch_model.bin)")
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"architectures": ["MadeUpViTForImageClassification"]}))
    (tmp_path / "unknown" / "model.safetensors").write_bytes(b"")
    r = _cli("export", str(tmp_path / "unknown"), "--out", str(tmp_path / "o2"))
    _one_line_error(r, "unknown architecture 'MadeUpViTForImageClassification'")
    (tmp_path / "timmunknown").mkdir()
    (tmp_path / "timmunknown" / "config.json").write_text(json.dumps({"architecture": "no_such_vit", "num_classes": 10}))
    torch.save({}, tmp_path / "timmunknown" / "pytorch_model.bin")
    r = _cli("export", str(tmp_path / "timmunknown"), "--out", str(tmp_path / "o3"))
    _one_line_error(r, "unknown timm model 'no_such_vit'")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


# ---------------------------------------------------------------------------- a user's own ViT, every form


def _forms(tmp_path: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    m = user_models.TinyViT().eval()
    x = torch.zeros(2, 1, 28, 28)
    p = {"pickle": tmp_path / "vit.pt", "torchscript": tmp_path / "vit_ts.pt", "exported": tmp_path / "vit.pt2"}
    torch.save(m, p["pickle"])
    torch.jit.save(torch.jit.trace(m, (x,)), str(p["torchscript"]))
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes=({0: batch},)), str(p["exported"]))
    return p


@pytest.mark.parametrize("form", ["pickle", "torchscript", "exported"])
def test_user_vit_every_form_loads_evaluates_and_exports_with_parity(form, tmp_path):
    import onnxruntime as ort

    from kdtoolkit.data import load_data
    from kdtoolkit.data.datasets import to_tensor
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.export.onnx_export import export_artifact
    from kdtoolkit.models.loading import load_model

    torch.manual_seed(0)
    ref = user_models.TinyViT().eval()
    x = torch.randn(3, 1, 28, 28)
    sp = load_data("mnist-mini", test_limit=64)
    with torch.no_grad():
        ref_acc = float((ref(to_tensor(sp.test.x, sp.spec)).argmax(1).numpy() == sp.test.y).mean())
    for path in [_forms(tmp_path)[form]]:
        loaded = load_model(path, trust_pickle=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(x), ref(x), rtol=1e-4, atol=1e-5)
        assert evaluate(loaded.module, sp.test, sp.spec)["accuracy"] == pytest.approx(ref_acc)
        art = export_artifact(loaded.module, (1, 1, 28, 28), tmp_path / f"exp-{form}", opset=17, config={}, model_meta={},
                              test=sp.test, spec=sp.spec)
        assert art.metrics["parity"]["max_abs_diff"] < 1e-4 and art.metrics["parity"]["top1_agreement"] == 1.0
        sess = ort.InferenceSession(str(art.file("model.onnx")), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]  # batch 3 through the dynamic batch axis
        with torch.no_grad():
            np.testing.assert_allclose(got, ref(x).numpy(), atol=1e-4)


def _compress_no_student(model: Path, out: Path, *extra: str, user_code: bool = False) -> subprocess.CompletedProcess:
    return _cli("compress", str(model), *extra, "--no-student", "--profile", "ort-cpu", "--data", "mnist-mini", "--iters", "5",
                "--train-limit", "256", "--test-limit", "128", "--set", "measure.batches=[1]", "--out", str(out), user_code=user_code)


def _check_run(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    t = json.loads((run / "00-teacher" / "manifest.json").read_text())
    assert t["metrics"]["accuracy"] is not None and t["info"]["model"]["input_size"] == [28, 28]
    e = json.loads((run / "03-export-teacher" / "manifest.json").read_text())
    assert e["metrics"]["parity"]["top1_agreement"] == 1.0 and e["info"]["input"]["shape"][0] == "batch"
    assert _cli("verify", str(run / "bundle")).returncode == 0
    return s


@pytest.mark.slow
def test_compress_no_student_user_vit_pickle(tmp_path):
    p = _forms(tmp_path)["pickle"]
    r = _compress_no_student(p, tmp_path / "run", "--trust-pickle", user_code=True)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_run(tmp_path / "run")
    t = json.loads((tmp_path / "run" / "00-teacher" / "manifest.json").read_text())
    assert t["info"]["model_file"] == "model.pt2"  # no later stage unpickles the user's file


@pytest.mark.slow
@pytest.mark.parametrize("form", ["torchscript", "exported"])
def test_compress_no_student_user_vit_graph_forms(form, tmp_path):
    p = _forms(tmp_path)[form]
    r = _compress_no_student(p, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    _check_run(tmp_path / "run")


@pytest.mark.slow
def test_compress_no_student_hf_folder_and_timm_state_dict(tmp_path):
    _hf_folder(tmp_path / "hf")
    r = _compress_no_student(tmp_path / "hf", tmp_path / "run-hf")
    assert r.returncode == 0, r.stderr[-2000:]
    _check_run(tmp_path / "run-hf")
    t = json.loads((tmp_path / "run-hf" / "00-teacher" / "manifest.json").read_text())
    assert t["info"]["recipe"]["arch"] == "hf:ViTForImageClassification" and t["info"]["model_file"] == "model.pt"
    torch.save(_timm_vit().state_dict(), tmp_path / "w.pth")
    r = _compress_no_student(tmp_path / "w.pth", tmp_path / "run-timm", "--arch", "timm:vit_tiny_patch16_224")
    assert r.returncode == 0, r.stderr[-2000:]
    _check_run(tmp_path / "run-timm")


@pytest.mark.parametrize("form", ["torchscript", "exported"])
@pytest.mark.parametrize("shape", [["--speedup", "2"], ["--depth", "0.5"]])
def test_student_from_graph_vit_is_refused_up_front(form, shape, tmp_path):
    """A ViT saved as a graph keeps its ops but not its block modules: the student stage says what to do instead,
    in one line, before the CNN surgery (or Torch-Pruning's trace) can fail on it."""
    p = _forms(tmp_path)[form]
    r = _cli("student", str(p), *shape, "--input-shape", "1,28,28", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # after the stage's progress lines
    assert last.startswith("error: the teacher is a vision transformer saved as a graph"), last
    assert "--student-arch" in last and "--arch timm:" in last
    assert not (tmp_path / "s").exists()
