"""The front door: `kdtoolkit compress model.pt --profile jetson-agx --data DATA` on the models users have.

Every form of `model.pt` a user may hold (a full pickle of their own class, TorchScript, a
`torch.export` program, a state dict with `module:callable`) goes to a bundle that `verify`
accepts; the student of a pickled teacher is stored so later stages need neither the user's
source code nor a second unpickling.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

USERCODE = Path(__file__).parent / "usercode"
sys.path.insert(0, str(USERCODE))
import user_models  # noqa: E402


def _cli(*args: str, user_code: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(USERCODE) if user_code else None, env.get("PYTHONPATH", "")
                                                      if user_code else None]))
    return subprocess.run([sys.executable, "-m", "kdtoolkit", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _save_forms(model: nn.Module, folder: Path) -> dict[str, Path]:
    model.eval()
    x = torch.zeros(2, 1, 28, 28)
    paths = {"pickle": folder / "model.pt", "torchscript": folder / "model_ts.pt", "exported": folder / "model.pt2",
             "state_dict": folder / "weights.pth"}
    torch.save(model, paths["pickle"])
    torch.jit.save(torch.jit.trace(model, (x,)), str(paths["torchscript"]))
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), str(paths["exported"]))
    torch.save(model.state_dict(), paths["state_dict"])
    return paths


FAST = ("--profile", "jetson-agx", "--data", "mnist-mini", "--max-steps", "2", "--qat-steps", "2", "--iters", "5",
        "--train-limit", "512", "--test-limit", "256")


@pytest.mark.parametrize("form", ["pickle", "torchscript", "exported", "state_dict"])
def test_compress_jetson_agx_every_model_form_to_a_verified_bundle(form, tmp_path):
    torch.manual_seed(0)
    paths = _save_forms(user_models.Plain(), tmp_path)
    extra = {"pickle": ["--trust-pickle"], "state_dict": ["--arch", "user_models:Plain"]}.get(form, [])
    run = tmp_path / "run"
    r = _cli("compress", str(paths[form]), *extra, *FAST, "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "profile: jetson-agx -> jetson-agx-orin" in r.stderr + r.stdout
    v = _cli("verify", str(run / "bundle"))
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-1000:]
    import json

    student = json.loads((run / "01-student" / "manifest.json").read_text())
    assert student["info"]["surgery"]["converted"], "the student must come from converting the teacher's own convolutions"
    assert student["metrics"]["params"] < json.loads((run / "00-teacher" / "manifest.json").read_text())["metrics"]["params"]
    assert student["info"]["model_file"] == "model.pt2"  # no portable recipe: stored as a torch.export program
    summary = json.loads((run / "summary.json").read_text())
    if summary["student"]["precision"] == "int8":  # ORT has no fast path for TensorRT's s8 QDQ: the proxy times FP32
        assert "student timed in FP32" in summary["latency_runtime"]
    # the distilled student loads without the user's source code and without unpickling anything
    code = ("from kdtoolkit.models.loading import load_model; import torch; m = load_model(%r); "
            "print(m.module(torch.zeros(3, 1, 28, 28)).shape)") % str(run / "02-distill")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and "torch.Size([3, 10])" in p.stdout, p.stderr[-1500:]


def test_pickle_trust_is_pinned_to_the_file(tmp_path):
    from kdtoolkit.errors import InputError
    from kdtoolkit.pipeline import CompressConfig, DataConfig, pin_model

    path = tmp_path / "model.pt"
    torch.save(user_models.Plain(), path)
    cfg = pin_model(CompressConfig(model=str(path), trust_pickle=True, data=DataConfig(source="mnist-mini")))
    assert cfg.model_sha256 and len(cfg.model_sha256) == 64
    assert pin_model(cfg).model_sha256 == cfg.model_sha256
    torch.save(user_models.ResNetish(), path)  # the file under the same name changes
    with pytest.raises(InputError, match="changed since this run was configured"):
        pin_model(cfg)


def test_rerun_from_config_refuses_a_changed_pickle(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(user_models.Plain(), path)
    run = tmp_path / "run"
    from kdtoolkit.pipeline import CompressConfig, DataConfig, pin_model, save_config

    run.mkdir()
    save_config(pin_model(CompressConfig(model=str(path), trust_pickle=True, data=DataConfig(source="mnist-mini"))),
                run / "config.yaml")
    torch.save(user_models.ResNetish(), path)
    r = _cli("compress", "--config", str(run / "config.yaml"))
    assert r.returncode == 2
    assert "changed since this run was configured" in r.stderr and "Traceback" not in r.stderr


def test_exported_graph_becomes_trainable_modules_with_the_same_outputs():
    from kdtoolkit.models.graph import export_program, modules_from_program

    torch.manual_seed(0)
    model = user_models.ResNetish().eval()
    x = torch.randn(5, 1, 28, 28)
    gm = modules_from_program(export_program(model, (1, 1, 28, 28)))
    convs = [n for n, m in gm.named_modules() if isinstance(m, nn.Conv2d)]
    assert "layer1.0.c1" in convs and len(convs) == 12
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gm.modules()) == 12
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
    gm.train()  # an ExportedProgram's own module() raises here
    gm(x).sum().backward()
    assert gm.get_submodule("layer1.0.c1").weight.grad is not None
    gm.eval()
    again = modules_from_program(export_program(gm, (1, 1, 28, 28)))  # a stored student reloads the same
    torch.testing.assert_close(again(x), gm(x), atol=1e-5, rtol=1e-5)


def test_torchscript_teacher_is_converted_for_surgery(tmp_path):
    from kdtoolkit.models.loading import as_graph_modules, load_model
    from kdtoolkit.student.build import StudentConfig, make_student

    torch.manual_seed(0)
    model = user_models.ResNetish().eval()
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(path)
    assert loaded.form == "torchscript" and not loaded.rewritable
    graph = as_graph_modules(loaded, (1, 1, 28, 28))
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(graph.module(x), model(x), atol=1e-5, rtol=1e-5)
    student, recipe, info = make_student(loaded, StudentConfig(), input_shape=(1, 1, 28, 28), num_classes=10)
    assert recipe is None and info["graph_converted_from"] == "torchscript"
    assert len(info["converted"]) == 11  # every 3x3 conv but the stem
    from kdtoolkit.student.transforms import SeparableConv2d

    assert type(student.get_submodule("stem.0")) is nn.Conv2d
    assert isinstance(student.get_submodule("layer1.0.c1"), SeparableConv2d)
    assert student(x).shape == (3, 10)


def test_module_callable_without_num_classes(tmp_path):
    from kdtoolkit.models.loading import load_model

    path = tmp_path / "w.pth"
    torch.save(user_models.Plain().state_dict(), path)
    loaded = load_model(path, arch="user_models:Plain")  # Plain() takes no num_classes
    assert loaded.module(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    loaded = load_model(tmp_path / "w.pth", arch="user_models:Plain", num_classes=10)
    assert loaded.recipe == {"arch": "user_models:Plain", "arch_kwargs": {"num_classes": 10}, "transforms": []}


def test_already_separable_teacher_gets_a_narrower_student():
    from kdtoolkit.errors import InputError
    from kdtoolkit.models.loading import LoadedModel
    from kdtoolkit.student.build import StudentConfig, count_params, make_student

    teacher = LoadedModel(user_models.SepNet().eval(), "pickle", "sep.pt")
    with pytest.raises(InputError, match="--width"):
        make_student(teacher, StudentConfig(), input_shape=(1, 1, 28, 28), num_classes=10)
    student, _, info = make_student(teacher, StudentConfig(width=0.5), input_shape=(1, 1, 28, 28), num_classes=10)
    assert info["converted"] == []
    assert count_params(student) < 0.5 * count_params(teacher.module)


def test_width_shrink_works_on_frozen_parameters_and_refuses_a_no_op():
    from kdtoolkit.errors import InputError
    from kdtoolkit.student.shrink import shrink_width

    model = user_models.ResNetish().eval()
    for p in model.parameters():
        p.requires_grad_(False)  # as a teacher is left after a training run in the same process
    before = sum(p.numel() for p in model.parameters())
    info = shrink_width(model, torch.zeros(1, 1, 28, 28), 0.5)
    assert info["params_after"] < 0.5 * before
    assert not any(p.requires_grad for p in model.parameters())
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # only the kept classifier: nothing to prune
    with pytest.raises(InputError, match="shrank nothing"):
        shrink_width(tiny, torch.zeros(1, 4), 0.5)


def test_search_meets_a_speedup_target():
    from kdtoolkit.models.loading import LoadedModel
    from kdtoolkit.student.build import StudentConfig
    from kdtoolkit.student.search import search

    teacher = LoadedModel(user_models.ResNetish(num_classes=10).eval(), "pickle", "r.pt")
    found = search(teacher, StudentConfig(), speedup=1.05, input_shape=(1, 1, 28, 28), num_classes=10, batch=16,
                   threads=1, iters=10, depths=(1.0, 0.34), widths=(1.0, 0.5))
    assert found["speedup_target"] == 1.05 and found["budget_ms"] == pytest.approx(found["teacher_p50_ms"] / 1.05)
    chosen = next(r for r in found["candidates"] if r["name"] == found["chosen"])
    assert chosen["meets_budget"] and chosen["p50_ms"] <= found["budget_ms"]


def test_detector_outputs_are_refused_in_preflight(tmp_path):
    path = tmp_path / "det.pt"
    torch.save(user_models.Detector(), path)
    run = tmp_path / "run"
    r = _cli("compress", str(path), "--trust-pickle", "--data", "mnist-mini", "--out", str(run))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not class logits" in r.stderr and "dict with keys boxes, scores" in r.stderr
    assert not run.exists()  # refused before anything was written


def test_compress_without_data_names_the_flag(tmp_path):
    r = _cli("compress", str(tmp_path / "model.pt"), "--profile", "jetson-agx")
    assert r.returncode == 2 and "--data" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_layernorm_is_exported_so_tensorrt_85_parses_it(tmp_path):
    import onnx

    from kdtoolkit.backends.check import check_file
    from kdtoolkit.export.onnx_export import export_onnx, opset_for_target
    from kdtoolkit.targets import load_profile

    class ConvNeXtish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.LayerNorm(8), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(self.conv(x).mean((2, 3))))

    path = tmp_path / "m.onnx"
    export_onnx(ConvNeXtish().eval(), (1, 1, 28, 28), path, opset=17)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "LayerNormalization" in ops
    prof = load_profile("jetson-agx")  # oldest TensorRT 8.5: no LayerNormalization in its parser
    assert any(f.severity == "error" for f in check_file(path, prof).findings)
    assert opset_for_target(path, 17, "8.6") == (17, None)
    lower, why = opset_for_target(path, 17, prof.tensorrt.min_version)
    assert lower == 16 and "LayerNormalization" in why and "8.5" in why
    export_onnx(ConvNeXtish().eval(), (1, 1, 28, 28), path, opset=lower)
    assert "LayerNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not [f for f in check_file(path, prof).findings if f.severity == "error"]


def test_no_student_exports_quantizes_and_bundles_the_teacher(tmp_path):
    import json

    path = tmp_path / "w.pth"
    torch.save(user_models.Plain().state_dict(), path)
    run = tmp_path / "run"
    r = _cli("compress", str(path), "--arch", "user_models:Plain", "--no-student", "--profile", "jetson-agx", "--data", "mnist-mini",
             "--iters", "5", "--test-limit", "256", "--out", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "teacher, no student (int8)" in r.stdout
    assert not (run / "01-student").exists() and not (run / "02-distill").exists()
    q = json.loads((run / "05-quantize" / "manifest.json").read_text())
    assert q["config"]["method"] == "ptq" and q["metrics"]["precision"] == "int8"
    assert json.loads((run / "summary.json").read_text())["no_student"] is True
    assert _cli("verify", str(run / "bundle")).returncode == 0


def test_safetensors_state_dict_with_arch(tmp_path):
    from safetensors.torch import save_file

    from kdtoolkit.errors import InputError
    from kdtoolkit.models.loading import load_model

    torch.manual_seed(0)
    model = user_models.ResNetish().eval()
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_model(tmp_path / "w.safetensors", arch="user_models:ResNetish")
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(loaded.module(x), model(x))
    with pytest.raises(InputError, match="--arch"):
        load_model(tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_model(tmp_path / "bad.safetensors", arch="user_models:ResNetish")


def test_width_shrink_that_breaks_a_graph_is_an_error_not_a_broken_student():
    from kdtoolkit.errors import InputError
    from kdtoolkit.models.graph import export_program, modules_from_program
    from kdtoolkit.models.zoo import ARCHS
    from kdtoolkit.student.shrink import shrink_width

    # option-A shortcuts zero-pad channels: as a module kdtoolkit prunes them; as a traced graph the padding is opaque
    eager = ARCHS.get("cifar_resnet20")(num_classes=10).eval()
    shrink_width(eager, torch.zeros(1, 3, 32, 32), 0.5)
    graph = modules_from_program(export_program(ARCHS.get("cifar_resnet20")(num_classes=10).eval(), (1, 3, 32, 32)))
    with pytest.raises(InputError, match="broke the model's channel structure"):
        shrink_width(graph, torch.zeros(1, 3, 32, 32), 0.5)


@pytest.mark.parametrize("precision", ["int8", "auto"])
def test_search_puts_int8_in_the_speed_budget_with_standard_conv_candidates(precision):
    """A profile that ships INT8 on ONNX Runtime: candidates are timed as the quantize stage's INT8 too, and
    standard-convolution variants join the separable ones (INT8 depthwise kernels are slow on ORT CPU)."""
    from kdtoolkit.models.loading import LoadedModel
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.student.build import StudentConfig
    from kdtoolkit.student.search import search
    from kdtoolkit.targets import load_profile

    teacher = LoadedModel(user_models.ResNetish(num_classes=10).eval(), "pickle", "r.pt")
    kw = dict(speedup=1.01, input_shape=(1, 1, 28, 28), num_classes=10, batch=8, threads=1, iters=6, depths=(1.0, 0.34),
              widths=(1.0,), best_effort=True)
    found = search(teacher, StudentConfig(), precision=precision, int8_scheme=scheme_for(load_profile("ort-cpu")), **kw)
    rows = {r["name"]: r for r in found["candidates"]}
    assert {"d1-w1", "d0.34-w1", "d0.34-w1-std"} <= set(rows) and rows["d0.34-w1-std"]["separable"] is False
    for r in rows.values():
        want = r["p50_int8_ms"] if precision == "int8" else min(r["p50_int8_ms"], r["p50_fp32_ms"])
        assert r["p50_ms"] == want and r["timed_as"] in ("int8", "fp32")
    assert found["precision"] == f"int8 in the budget ({precision})"
    plain = search(teacher, StudentConfig(), precision="fp32", **kw)  # FP32 profiles: separable only, FP32 timing
    assert all("p50_int8_ms" not in r and r["separable"] for r in plain["candidates"]) and plain["precision"] == "fp32"


def test_int8_search_adds_late_heavy_shapes_on_its_default_grid():
    """With INT8 in the budget the default grid also tries the fewest blocks in every stage but the last, and a
    growing share of the last (a wide, low-resolution stage is cheap in ORT's INT8 kernels)."""
    from kdtoolkit.models import build_arch
    from kdtoolkit.models.loading import LoadedModel
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.student.build import StudentConfig
    from kdtoolkit.student.search import late_heavy_plans, search
    from kdtoolkit.targets import load_profile

    assert [p["layer3"] for p in late_heavy_plans(build_arch("cifar_resnet56"), (1, 3, 32, 32))] == [1, 2, 3, 4, 5, 6, 9]
    assert all(p["layer1"] == 0 and p["layer2"] == 1 for p in late_heavy_plans(build_arch("cifar_resnet56"), (1, 3, 32, 32)))
    teacher = LoadedModel(user_models.ResNetish(num_classes=10).eval(), "pickle", "r.pt")
    kw = dict(speedup=1.01, input_shape=(1, 1, 28, 28), num_classes=10, batch=8, threads=1, iters=4, widths=(1.0,), best_effort=True)
    found = search(teacher, StudentConfig(), precision="auto", int8_scheme=scheme_for(load_profile("ort-cpu")), **kw)
    rows = {r["name"]: r for r in found["candidates"]}
    assert rows["keep0-1-std"]["keep_blocks"] == {"layer1": 0, "layer2": 1} and rows["keep0-1-std"]["separable"] is False
    assert rows["keep0-1-std"]["params"] < rows["keep0-2-std"]["params"]
    plain = search(teacher, StudentConfig(), precision="fp32", **kw)  # FP32 profiles keep the uniform grid
    assert not any("keep_blocks" in r for r in plain["candidates"])


USER_MODULE = """
import torch.nn as nn


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.b2(self.c2(self.b1(self.c1(x)).relu())).relu()
        return self.fc(x.mean((2, 3)))
"""


def _console_script() -> Path:
    script = Path(sys.executable).parent / "kdtoolkit"
    if not script.exists():
        pytest.skip(f"the installed console script is not at {script} (install with pip install -e .)")
    return script


def _run_in(folder: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONWARNINGS="ignore", COLUMNS="200")
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=folder, env=env, timeout=300)


def test_installed_command_imports_the_users_module_from_the_current_folder(tmp_path):
    """`python train.py` found the user's models.py in the current folder when it saved the model; the installed
    `kdtoolkit` script (not `python -m`, which the other tests use) must find it there too."""
    script = _console_script()
    (tmp_path / "mynets.py").write_text(USER_MODULE)
    saved = _run_in(tmp_path, sys.executable, "-c", "import torch, mynets; m = mynets.Net(); "
                    "torch.save(m, 'model.pt'); torch.save(m.state_dict(), 'weights.pt')")
    assert saved.returncode == 0, saved.stderr
    for args in (["model.pt", "--trust-pickle"], ["weights.pt", "--arch", "mynets:Net"]):
        r = _run_in(tmp_path, str(script), "student", *args, "--out", f"s_{args[0]}", "--input-shape", "3,16,16")
        assert r.returncode == 0, r.stderr[-1500:]
        assert "student written to" in r.stdout + r.stderr
    # elsewhere, without the module: one line that says what is missing and the ways out
    other = tmp_path / "elsewhere"
    other.mkdir()
    r = _run_in(other, str(script), "student", str(tmp_path / "model.pt"), "--trust-pickle", "--out", "s", "--input-shape", "3,16,16")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs module 'mynets', which is not importable here" in r.stderr and "PYTHONPATH" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # the module is there but the class was renamed since the model was saved
    (tmp_path / "mynets.py").write_text(USER_MODULE.replace("class Net(", "class Network("))
    r = _run_in(tmp_path, str(script), "student", "model.pt", "--trust-pickle", "--out", "s_renamed", "--input-shape", "3,16,16")
    assert r.returncode == 2 and "module 'mynets' was found but has no 'Net'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_pickle_of_a_class_defined_in_the_saving_script_gets_the_ways_out(tmp_path):
    script = _console_script()
    saved = _run_in(tmp_path, sys.executable, "-c", USER_MODULE + "\nimport torch\ntorch.save(Net(), 'model.pt')\n")
    assert saved.returncode == 0, saved.stderr
    r = _run_in(tmp_path, str(script), "student", "model.pt", "--trust-pickle", "--out", "s", "--input-shape", "3,16,16")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "class 'Net' from the script that saved it (__main__)" in r.stderr and "--arch module:Class" in r.stderr
