import pytest
import torch
from torch import nn

from kdtoolkit.errors import InputError
from kdtoolkit.models import build_arch
from kdtoolkit.student.transforms import SeparableConv2d, droppable_blocks, plan_depth, rank1_init, to_separable


def test_rank1_init_is_exact_for_rank1_kernels():
    torch.manual_seed(0)
    out_c, in_c = 6, 4
    p = torch.randn(in_c, out_c)
    d = torch.randn(in_c, 3, 3)
    w = torch.einsum("io,ikl->oikl", p, d)  # every W[:, i] is rank 1
    conv = nn.Conv2d(in_c, out_c, 3, stride=2, padding=2, dilation=2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(w)
    sep = SeparableConv2d(conv)
    energy = rank1_init(sep, conv.weight, conv.bias)
    assert energy == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(2, in_c, 11, 11)
    torch.testing.assert_close(sep(x), conv(x), atol=1e-4, rtol=1e-4)
    assert sep.depthwise.stride == (2, 2) and sep.depthwise.dilation == (2, 2) and sep.depthwise.padding == (2, 2)


def test_rank1_init_is_the_best_rank1_approximation():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, 3, bias=False)
    sep = SeparableConv2d(conv)
    rank1_init(sep, conv.weight, None)
    approx = (sep.pointwise.weight[:, :, 0, 0][:, :, None, None] * sep.depthwise.weight[:, 0][None]).detach()
    err = (approx - conv.weight).pow(2).sum()
    # a random perturbation of the factors cannot do better
    noisy = approx + 0.01 * torch.randn_like(approx)
    assert err <= (noisy - conv.weight).pow(2).sum()


def test_conversion_options_and_nothing_to_convert():
    m = build_arch("cifar_resnet20")
    info = to_separable(m, skip=["layer3"])
    assert "conv1" not in info["converted"]  # stem kept by default
    assert not any(n.startswith("layer3") for n in info["converted"])
    assert len(info["converted"]) == 12
    m2 = build_arch("cifar_resnet20")
    assert len(to_separable(m2, only=["layer2"])["converted"]) == 6
    m3 = build_arch("cifar_resnet20")
    assert len(to_separable(m3, skip_stem=False, skip_first=3)["converted"]) == 16
    with pytest.raises(InputError, match="nothing to convert"):
        to_separable(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(8, 2)))


def test_depth_plan_only_drops_shape_preserving_blocks():
    m = build_arch("cifar_resnet56")
    x = torch.zeros(1, 3, 32, 32)
    dropp = droppable_blocks(m, x)
    assert dropp["layer2"] == list(range(1, 9))  # block 0 changes shape
    assert plan_depth(m, x, 0.34) == {"layer1": 3, "layer2": 3, "layer3": 3}


def test_student_command_table_json_and_search(tmp_path):
    import json

    from conftest import run_cli, shared_file

    w = shared_file("weights/resnet20-cifar10.th")
    r = run_cli("student", str(w), "--arch", "cifar_resnet20", "--out", str(tmp_path / "s"), "--input-shape", "3,32,32",
                "--width", "0.5", "--batch", "1", "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "s.json").read_text())
    for who in ("teacher", "student"):
        assert res[who]["params"] > 0 and res[who]["macs"] > 0 and res[who]["latency_ms"]["p50"] > 0
    assert res["student"]["params"] < res["teacher"]["params"] / 4
    assert "speedup" in r.stdout
    # the saved student reloads without the teacher
    from kdtoolkit.models import load_model

    assert load_model(tmp_path / "s").module(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    # a budget below anything reachable is a clear error; a generous one picks the most capable candidate
    r = run_cli("student", str(w), "--arch", "cifar_resnet20", "--out", str(tmp_path / "s2"), "--input-shape", "3,32,32",
                "--latency-budget", "0.00001", "--batch", "1")
    assert r.returncode == 2 and "no student meets" in r.stderr
    r = run_cli("student", str(w), "--arch", "cifar_resnet20", "--out", str(tmp_path / "s3"), "--input-shape", "3,32,32",
                "--latency-budget", "1000", "--batch", "1", "--json", str(tmp_path / "s3.json"))
    assert r.returncode == 0, r.stderr
    found = json.loads((tmp_path / "s3.json").read_text())["search"]
    # ort-cpu ships INT8 when it is faster (precision auto), so INT8 is in the budget: 4 depths x 5 widths, separable and
    # standard (less the standard copy of the teacher), and 3 late-heavy shapes (0/1/k blocks per stage, k = 1..3); every
    # candidate meets 1 s and the most capable one wins
    assert found["precision"] == "int8 in the budget (auto)" and len(found["candidates"]) == 42
    assert {"keep0-1-1-std", "keep0-1-2-std", "keep0-1-3-std"} <= {c["name"] for c in found["candidates"]}
    assert all(c["meets_budget"] for c in found["candidates"])
    assert found["chosen"] == max(found["candidates"], key=lambda c: (c["macs"], c["params"]))["name"] == "d0.67-w1-std"


@pytest.mark.parametrize("separable", [True, False])
def test_student_of_a_frozen_teacher_trains_every_parameter(separable):
    """A teacher frozen by an earlier distillation in the same process (the trainer freezes teachers) must not hand
    its frozen parameters to the student: a standard-conv student of it had nothing to train (seen in a benchmark)."""
    from kdtoolkit.models.loading import LoadedModel
    from kdtoolkit.student.build import StudentConfig, make_student

    net = build_arch("cifar_resnet20", num_classes=10)
    for p in net.parameters():
        p.requires_grad_(False)
    teacher = LoadedModel(net, "eager", "test", arch="cifar_resnet20", recipe={"arch": "cifar_resnet20", "arch_kwargs": {"num_classes": 10},
                                                                              "transforms": []})
    s, _, _ = make_student(teacher, StudentConfig(depth=0.34, separable=separable, bn_recalib_batches=0), input_shape=(1, 3, 32, 32),
                           num_classes=10)
    assert all(p.requires_grad for p in s.parameters())
    assert not any(p.requires_grad for p in net.parameters())  # the teacher stays frozen


def test_keep_blocks_plans_named_stages_and_refuses_what_cannot_go():
    m = build_arch("cifar_resnet56")
    x = torch.zeros(1, 3, 32, 32)
    # named stages take their own count (0 empties a stage of shape-preserving blocks); the rest follow the fraction
    assert plan_depth(m, x, 1.0, keep={"layer1": 0, "layer3": 4}) == {"layer1": 0, "layer3": 4}
    assert plan_depth(m, x, 0.12, keep={"layer3": 4}) == {"layer1": 1, "layer2": 1, "layer3": 4}
    with pytest.raises(InputError, match=r"layer2=0: the stage has 9 blocks and must keep between 1 and 9 \(its first block"):
        plan_depth(m, x, 1.0, keep={"layer2": 0})
    with pytest.raises(InputError, match="names layer4, which is not a stage .*stages: layer1, layer2, layer3"):
        plan_depth(m, x, 1.0, keep={"layer4": 1})


def test_keep_blocks_on_a_graph_form_model_names_the_state_dict_route(tmp_path):
    """A torch.export program (or TorchScript) rebuilt as modules has no stages to shorten: the error says what to do."""
    from kdtoolkit.models.graph import save_program
    from kdtoolkit.models.loading import load_model

    m = build_arch("cifar_resnet20").eval()
    save_program(m, tmp_path / "m.pt2", (1, 3, 32, 32))
    g = load_model(str(tmp_path / "m.pt2")).module
    x = torch.zeros(1, 3, 32, 32)
    assert torch.allclose(g(x), m(x), atol=1e-5)
    with pytest.raises(InputError, match=r"stages: none\); a model loaded from TorchScript or torch.export .* state dict with --arch"):
        plan_depth(g, x, 1.0, keep={"layer1": 0})
    with pytest.raises(InputError) as e:  # a model with stages gets no such hint
        plan_depth(m, x, 1.0, keep={"layer4": 0})
    assert "--arch" not in str(e.value)


@pytest.mark.parametrize("form", ["torchscript", "exported"])
def test_keep_blocks_hint_survives_the_students_copy_of_a_graph_teacher(tmp_path, form):
    """The student is cut from a deep copy of the teacher, and a GraphModule's deepcopy drops attributes set on it:
    the graph mark must survive it, or `compress model.ts --keep-blocks` (the CLI path) loses the hint."""
    from kdtoolkit.models.graph import save_program
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.student.build import StudentConfig, make_student

    m = build_arch("cifar_resnet20").eval()
    if form == "torchscript":
        path = tmp_path / "m.ts"
        torch.jit.trace(m, torch.zeros(1, 3, 32, 32)).save(str(path))
    else:
        path = tmp_path / "m.pt2"
        save_program(m, path, (1, 3, 32, 32))
    with pytest.raises(InputError, match=r"stages: none\); a model loaded from TorchScript or torch.export .* --arch"):
        make_student(load_model(str(path)), StudentConfig(keep_blocks={"layer1": 0}), input_shape=(1, 3, 32, 32), num_classes=10)


def test_keep_blocks_student_is_late_heavy_and_replays_from_its_recipe(tmp_path):
    """The headline's shape: no block at 32x32, one at 16x16, four at 8x8 (INT8 on ORT CPU runs the 64-channel
    stage cheaply: benchmarks/results/reference.json)."""
    from kdtoolkit.models.loading import LoadedModel, load_model, save_model
    from kdtoolkit.student.build import StudentConfig, count_params, make_student

    torch.manual_seed(0)
    t = build_arch("cifar_resnet56").eval()
    teacher = LoadedModel(t, "eager", "t.pt", arch="cifar_resnet56", recipe={"arch": "cifar_resnet56", "arch_kwargs": {}, "transforms": []})
    s, recipe, info = make_student(teacher, StudentConfig(keep_blocks={"layer1": 0, "layer2": 1, "layer3": 4}, separable=False),
                                   input_shape=(1, 3, 32, 32), num_classes=10)
    assert [len(s.layer1), len(s.layer2), len(s.layer3)] == [0, 1, 4]
    assert info["dropped_blocks"] == {"layer1": 9, "layer2": 8, "layer3": 5}
    assert count_params(s) == 292570  # the benchmark's figure for this shape
    x = torch.randn(2, 3, 32, 32)
    s.eval()
    # teacher-initialised: layer2.0 and layer3.0-3 are the teacher's own blocks
    torch.testing.assert_close(s.layer3[3].conv1.weight, t.layer3[3].conv1.weight)
    save_model(tmp_path, s, recipe, {}, (1, 3, 32, 32))
    back = load_model(next(tmp_path.glob("model.*")))
    torch.testing.assert_close(back.module(x), s(x))
    with pytest.raises(InputError, match="keeps every block"):
        make_student(teacher, StudentConfig(keep_blocks={"layer3": 9}, separable=False), input_shape=(1, 3, 32, 32), num_classes=10)


@pytest.mark.parametrize("spec,msg", [("layer1", "takes STAGE=N pairs"), ("layer2=0", "must keep between 1 and 9"),
                                      ("layer1=-1", "takes STAGE=N pairs")])
def test_keep_blocks_cli_errors_are_one_line(tmp_path, spec, msg):
    from conftest import run_cli

    sd = tmp_path / "t.pt"
    torch.save(build_arch("cifar_resnet56").state_dict(), sd)
    r = run_cli("student", str(sd), "--arch", "cifar_resnet56", "--keep-blocks", spec, "--no-separable", "--out", str(tmp_path / "s"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert msg in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists()
