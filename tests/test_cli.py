"""The compress pipeline and the CLI as a user meets them: real runs, exit codes, one-line errors."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, shared_file


def _compress(tmp_path, teacher, *extra, cwd=None):
    return run_cli("compress", str(teacher), "--data", "mnist-mini", "--profile", "ort-cpu", "--out", str(tmp_path / "run"),
                   "--max-steps", "6", "--epochs", "1", "--batch-size", "64", "--iters", "5", "--train-limit", "800",
                   "--test-limit", "300", "-q", *extra, cwd=cwd)


def test_compress_runs_end_to_end_then_skips_and_reruns_from_config(tmp_path, tiny_teacher):
    import shutil

    tiny_teacher = Path(shutil.copy(tiny_teacher, tmp_path / "teacher.pt"))
    r = _compress(tmp_path, "teacher.pt", cwd=tmp_path)  # a path relative to where the user stands
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    for who in ("teacher", "student"):
        row = summary[who]
        assert 0.0 <= row["accuracy"] <= 1.0 and row["params"] > 0 and row["size_bytes"] > 0
        assert row["latency_ms"]["batch"] == 1 and row["latency_ms"]["p50"] > 0 and row["latency_ms"]["p90"] >= row["latency_ms"]["p50"]
    assert summary["student"]["params"] < summary["teacher"]["params"]
    assert (run / "report.md").read_text().startswith("# kdtoolkit run")
    for stage in summary["stages"].values():
        man = json.loads((Path(stage) / "manifest.json").read_text())
        assert man["schema_version"] == 1 and man["files"] and man["environment"]["torch"]
    # lineage: the deployable ONNX comes from the distilled student
    opt = json.loads((Path(summary["stages"]["optimize"]) / "manifest.json").read_text())
    assert opt["parents"][0]["stage"] in ("export", "quantize")
    # rerun: every stage is up to date
    again = _compress(tmp_path, "teacher.pt", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["skipped"] == list(s2["stages"]) and {"teacher", "student", "distill", "export", "profile"} <= set(s2["skipped"])
    # the saved config reruns the same thing, from any folder: the relative model path was recorded absolute
    assert (run / "config.yaml").read_text().startswith(f"model: {tiny_teacher}\n")
    (tmp_path / "elsewhere").mkdir()
    cfg = run_cli("compress", "--config", str(run / "config.yaml"), "-q", cwd=tmp_path / "elsewhere")
    assert cfg.returncode == 0, cfg.stderr
    s3 = json.loads((run / "summary.json").read_text())
    assert s3["skipped"] == list(s3["stages"])


def test_changed_training_config_reruns_only_downstream(tmp_path, tiny_teacher):
    assert _compress(tmp_path, tiny_teacher).returncode == 0
    r = _compress(tmp_path, tiny_teacher, "--lr", "0.01")
    assert r.returncode == 0, r.stderr
    skipped = json.loads((tmp_path / "run" / "summary.json").read_text())["skipped"]
    assert skipped == ["teacher", "student", "export-teacher"]


def test_tensorrt_profile_goes_as_far_as_it_truthfully_can(tmp_path, tiny_teacher):
    r = run_cli("compress", str(tiny_teacher), "--data", "mnist-mini", "--profile", "jetson-agx-orin", "--out", str(tmp_path / "run"),
                "--max-steps", "3", "--epochs", "1", "--batch-size", "64", "--iters", "5", "--train-limit", "500", "--test-limit", "200", "-q")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "proxy" in s["latency_runtime"] and "not measured" in s["latency_runtime"]
    assert set(s["teacher"]["latency_by_batch"]) == {"1"}  # the profile's batch range caps at 16


def test_torchscript_teacher_with_a_named_student_arch(tmp_path):
    # converting the TorchScript graph itself is the default (tests/test_front_door.py); --student-arch opts out
    from kdtoolkit.models import build_arch

    m = build_arch("small_cnn", num_classes=10, in_channels=1, width=0.25).eval()
    torch.jit.save(torch.jit.trace(m, torch.zeros(1, 1, 28, 28)), tmp_path / "t.pt")
    r = _compress(tmp_path, tmp_path / "t.pt", "--student-arch", "small_cnn")
    assert r.returncode == 0, r.stderr
    import json

    surgery = json.loads((tmp_path / "run" / "01-student" / "manifest.json").read_text())["info"]["surgery"]
    assert "graph_converted_from" not in surgery


@pytest.mark.parametrize("args,needle", [
    (["compress", "missing.pt", "--data", "mnist-mini", "--out", "o"], "model file not found"),
    (["compress", "{teacher}", "--data", "nowhere", "--out", "o"], "data not found"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--profile", "nope", "--out", "o"], "unknown profile"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--profile", "{bad_yaml}", "--out", "o"], "unknown key 'batch.maxx' (line 3)"),
    (["compress", "{sd}", "--data", "mnist-mini", "--out", "o"], "--arch"),
    (["compress", "{sd}", "--arch", "resnet9000", "--data", "mnist-mini", "--out", "o"], "known: "),
    (["compress", "{teacher}", "--data", "{cifar10}", "--out", "o"], "10 outputs (classes in its metadata) but the data has 3 classes"),
    (["profiles", "show", "nope"], "unknown profile"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--augment", "bogus", "--out", "o"], "train.augment='bogus': Input should be"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--loss", "bogus", "--out", "o"], "unknown loss 'bogus'; known: ce, dist, dkd"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--depth", "2", "--out", "o"], "student.depth=2.0: Input should be less than"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--on-bad-image", "maybe", "--out", "o"], "on_bad_image='maybe': must be fail or skip"),
    (["quantize", "{teacher}", "--data", "mnist-mini", "--on-bad-image", "maybe", "--out", "o"], "--on-bad-image must be fail or skip"),
    (["quantize", "{teacher}", "--data", "nowhere", "--calib-size", "0", "--out", "o"], "calib_size=0: Input should be greater than"),
    (["student", "{teacher}", "--depth", "2", "--out", "o"], "depth=2.0: Input should be less than or equal to 1"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, tiny_teacher, args, needle):
    import numpy as np

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbackend: onnxruntime\nbatch: {maxx: 3}\n")
    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, sd)
    np.savez(tmp_path / "c3.npz", x_train=np.zeros((40, 28, 28), np.uint8), y_train=np.arange(40) % 3,
             x_test=np.zeros((9, 28, 28), np.uint8), y_test=np.arange(9) % 3)
    subs = {"{teacher}": str(tiny_teacher), "{bad_yaml}": str(bad), "{sd}": str(sd), "{cifar10}": str(tmp_path / "c3.npz")}
    r = run_cli(*[subs.get(a, a) for a in args], cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_pickle_without_trust_is_refused_on_the_cli(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))
    torch.save(m, tmp_path / "full.pt")
    r = _compress(tmp_path, tmp_path / "full.pt")
    assert r.returncode == 2 and "--trust-pickle" in r.stderr


def test_help_version_env_and_profiles():
    assert run_cli("--version").stdout.startswith("kdtoolkit ")
    h = run_cli("--help")
    assert h.returncode == 0 and "compress" in h.stdout and "demo" in h.stdout
    assert run_cli("compress", "--help").returncode == 0
    env = run_cli("env")
    assert env.returncode == 0 and "onnxruntime" in env.stdout and "avx2" in env.stdout
    lst = run_cli("profiles", "list")
    assert lst.returncode == 0 and "jetson-agx-orin" in lst.stdout
    show = run_cli("profiles", "show", "ort-cpu")
    assert show.returncode == 0 and "backend: onnxruntime" in show.stdout


def test_debug_shows_traceback():
    r = run_cli("--debug", "compress", "missing.pt", "--data", "mnist-mini", "--out", "o")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.slow
def test_shared_resnet56_compress_short_budget(tmp_path, cifar_dir):
    """The issue's check: the shared teacher's JPEG test accuracy (~83 %) and a faster student."""
    weights = shared_file("weights/resnet56-cifar10.th")
    r = run_cli("compress", str(weights), "--arch", "cifar_resnet56", "--data", str(cifar_dir), "--profile", "ort-cpu",
                "--out", str(tmp_path / "r56"), "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225",
                "--max-steps", "50", "--train-limit", "5000", "--iters", "20", "-q", timeout=3000)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r56" / "summary.json").read_text())
    assert s["teacher"]["accuracy"] == pytest.approx(0.832, abs=0.01)
    assert s["speedup"]["b1"] > 1.0


# --- input size and normalisation: one resolution order on every command (issue 13, item 4) ------

IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def _zoo_state_dict(tmp_path, arch="cifar_resnet8", **kw):
    from kdtoolkit.models import build_arch

    torch.manual_seed(0)
    path = tmp_path / f"{arch}.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in build_arch(arch, **kw).state_dict().items()}}, path)
    return path


def test_export_and_student_of_a_zoo_state_dict_need_no_input_shape_and_carry_mean_std(tmp_path):
    sd = _zoo_state_dict(tmp_path)
    r = run_cli("export", str(sd), "--arch", "cifar_resnet8", "--out", str(tmp_path / "e"), "--mean", IMAGENET_MEAN, "--std", IMAGENET_STD)
    assert r.returncode == 0, r.stderr
    model = json.loads((tmp_path / "e" / "manifest.json").read_text())["info"]["model"]
    assert model["input_size"] == [32, 32] and model["channels"] == 3 and model["input_source"]["input_size"] == "zoo cifar_resnet8"
    assert model["mean"] == [0.485, 0.456, 0.406] and model["std"] == [0.229, 0.224, 0.225] and model["input_source"]["mean"] == "flag"
    import onnx

    dims = [d.dim_value for d in onnx.load(str(tmp_path / "e" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 32, 32]
    r = run_cli("student", str(sd), "--arch", "cifar_resnet8", "--out", str(tmp_path / "s"), "--batch", "1", "--width", "0.5",
                "--mean", IMAGENET_MEAN, "--std", IMAGENET_STD)
    assert r.returncode == 0, r.stderr
    model = json.loads((tmp_path / "s" / "manifest.json").read_text())["info"]["model"]
    assert model["input_size"] == [32, 32] and model["mean"] == [0.485, 0.456, 0.406]
    # the old compress spelling is an alias: --input-size H,W with --channels
    r = run_cli("export", str(sd), "--arch", "cifar_resnet8", "--out", str(tmp_path / "e2"), "--input-size", "40,40", "--channels", "3")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e2" / "manifest.json").read_text())["info"]["model"]["input_size"] == [40, 40]


@pytest.mark.parametrize("args,needle", [
    (["export", "{sd}", "--arch", "cifar_resnet8", "--mean", "0.5,0.5"], "--mean has 2 value(s) but the model input has 3 channel(s)"),
    (["quantize", "{sd}", "--arch", "cifar_resnet8", "--data", "mnist-mini", "--std", "0.2,0.2"], "--std has 2 value(s)"),
    (["student", "{sd}", "--arch", "cifar_resnet8", "--input-shape", "1,32,32"], "--input-shape gives 1 channel(s) but the model's first convolution takes 3"),
    (["export", "{sd}", "--arch", "cifar_resnet8", "--input-shape", "3,32"], None),
    (["export", "{small}", "--arch", "small_cnn"], "the model carries no input size; give --input-shape C,H,W (or --data)"),
    (["distill", "{sd}", "--arch", "cifar_resnet8", "--student-arch", "cifar_resnet8", "--data", "mnist-mini", "--std", "0,1,1"], "--std values must be positive"),
])
def test_input_flag_errors_are_one_line_naming_the_flag(tmp_path, args, needle):
    subs = {"{sd}": str(_zoo_state_dict(tmp_path)), "{small}": str(_zoo_state_dict(tmp_path, "small_cnn"))}
    r = run_cli(*[subs.get(a, a) for a in args], "--out", str(tmp_path / "o"), cwd=tmp_path)
    if needle is None:  # H,W is accepted (the --input-size form); the zoo gives the channels
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_quantize_exports_a_state_dict_at_the_datas_size_and_says_when_it_measured_the_normalisation(tmp_path):
    sd = _zoo_state_dict(tmp_path, "small_cnn")  # small_cnn fixes no size: the data's 28x28 it is
    r = run_cli("quantize", str(sd), "--arch", "small_cnn", "--data", "mnist-mini", "--out", str(tmp_path / "q"), "--calib-size", "64")
    assert r.returncode == 0, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note: normalisation")]
    assert len(notes) == 1 and "measured from the data" in notes[0] and "--mean/--std" in notes[0]
    man = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert man["info"]["input"]["shape"][1:] == [1, 28, 28]
    assert man["info"]["model"]["input_source"]["mean"] == "data" and len(man["info"]["model"]["mean"]) == 1
    assert man["metrics"]["n_test"] == 2000
    # given, the normalisation is used as given and nothing is noted
    r = run_cli("quantize", str(sd), "--arch", "small_cnn", "--data", "mnist-mini", "--out", str(tmp_path / "q2"), "--calib-size", "64",
                "--mean", "0.13", "--std", "0.31")
    assert r.returncode == 0, r.stderr
    assert "note: normalisation" not in r.stderr
    model = json.loads((tmp_path / "q2" / "manifest.json").read_text())["info"]["model"]
    assert model["mean"] == [0.13] and model["input_source"]["mean"] == "flag"


@pytest.mark.slow
@pytest.mark.parametrize("via_export", [False, True])
def test_finetuned_resnet56_quantize_reports_its_own_fp32_accuracy(tmp_path, via_export):
    """Issue 13's check: with its own normalisation the fine-tuned ResNet-56 scores 89.94 % on all
    10,000 JPEG test images (88.12 % when calibrated and evaluated with statistics measured from the data)."""
    weights = shared_file("weights/resnet56-cifar10-jpeg-ft.th")
    data = shared_file("cifar10-jpeg.tar.gz")
    norm = ["--mean", IMAGENET_MEAN, "--std", IMAGENET_STD]
    model, extra = str(weights), ["--arch", "cifar_resnet56", *norm]
    if via_export:
        r = run_cli("export", str(weights), "--arch", "cifar_resnet56", *norm, "--out", str(tmp_path / "exp"))
        assert r.returncode == 0, r.stderr
        model, extra = str(tmp_path / "exp"), []  # the export carries the mean/std
    r = run_cli("quantize", model, *extra, "--data", str(data), "--profile", "ort-cpu", "--out", str(tmp_path / "q"), timeout=1200)
    assert r.returncode == 0, r.stderr
    assert "note: normalisation" not in r.stderr
    assert "top-1 on 10000 test images (ONNX Runtime): FP32 89.94 %" in r.stdout, r.stdout
    m = json.loads((tmp_path / "q" / "manifest.json").read_text())["metrics"]
    assert m["n_test"] == 10000 and m["accuracy_fp32"] == pytest.approx(0.8994, abs=5e-5)


def test_every_command_that_reads_images_takes_on_bad_image(tmp_path, tiny_teacher):
    """A user's folder with one unreadable file: each command names the file and the flag, and with
    --on-bad-image skip goes on (compress and distill had the flag; quantize, export and student did not)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):  # the teacher's ten digit classes
        (tmp_path / "imgs" / str(c)).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (28, 28), np.uint8)).save(tmp_path / "imgs" / str(c) / f"{i}.png")
    (tmp_path / "imgs" / "3" / "broken.png").write_bytes(b"not an image")
    for cmd, extra in (("quantize", ["--calib-size", "16"]), ("export", []), ("student", [])):
        args = [cmd, str(tiny_teacher), "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / cmd), *extra]
        r = run_cli(*args)
        assert r.returncode == 2 and "broken.png: cannot read image" in r.stderr and "--on-bad-image skip" in r.stderr, (cmd, r.stderr[-800:])
        r = run_cli(*args, "--on-bad-image", "skip")
        assert r.returncode == 0, (cmd, r.stderr[-800:])


def test_compress_records_local_paths_absolute_and_leaves_names_and_links_alone(tmp_path, monkeypatch):
    import os

    from kdtoolkit.cli.compress import _absolute_paths

    monkeypatch.chdir(tmp_path)
    for name in ("mnist-mini", "jetson-orin", "imgs"):  # folders named like a built-in dataset and a profile (a run's --out)
        (tmp_path / name).mkdir()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc123").write_bytes(b"weights")
    os.symlink(tmp_path / "blobs" / "abc123", tmp_path / "model.safetensors")
    (tmp_path / "p.yaml").write_text("name: p\n")
    model, data, profile = _absolute_paths("model.safetensors", "mnist-mini", "jetson-orin")
    assert (model, data, profile) == (str(tmp_path / "model.safetensors"), "mnist-mini", "jetson-orin")
    assert _absolute_paths("missing.pt", "imgs", "p.yaml") == ("missing.pt", str(tmp_path / "imgs"), str(tmp_path / "p.yaml"))
