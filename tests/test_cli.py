"""The compress pipeline and the CLI as a user meets them: real runs, exit codes, one-line errors."""

import json
from pathlib import Path

import pytest
import torch

from conftest import run_cli, shared_file


def _compress(tmp_path, teacher, *extra):
    return run_cli("compress", str(teacher), "--data", "mnist-mini", "--profile", "ort-cpu", "--out", str(tmp_path / "run"),
                   "--max-steps", "6", "--epochs", "1", "--batch-size", "64", "--iters", "5", "--train-limit", "800",
                   "--test-limit", "300", "-q", *extra)


def test_compress_runs_end_to_end_then_skips_and_reruns_from_config(tmp_path, tiny_teacher):
    r = _compress(tmp_path, tiny_teacher)
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
    again = _compress(tmp_path, tiny_teacher)
    assert again.returncode == 0, again.stderr
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["skipped"] == list(s2["stages"]) and {"teacher", "student", "distill", "export", "profile"} <= set(s2["skipped"])
    # the saved config reruns the same thing
    cfg = run_cli("compress", "--config", str(run / "config.yaml"), "-q")
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


def test_torchscript_teacher_needs_student_arch(tmp_path):
    from kdtoolkit.data import load_data
    from kdtoolkit.models import build_arch

    m = build_arch("small_cnn", num_classes=10, in_channels=1, width=0.25).eval()
    torch.jit.save(torch.jit.trace(m, torch.zeros(1, 1, 28, 28)), tmp_path / "t.pt")
    r = _compress(tmp_path, tmp_path / "t.pt")
    assert r.returncode == 2 and "--student-arch" in r.stderr and "Traceback" not in r.stderr
    r = _compress(tmp_path, tmp_path / "t.pt", "--student-arch", "small_cnn")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["compress", "missing.pt", "--data", "mnist-mini", "--out", "o"], "model file not found"),
    (["compress", "{teacher}", "--data", "nowhere", "--out", "o"], "data not found"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--profile", "nope", "--out", "o"], "unknown profile"),
    (["compress", "{teacher}", "--data", "mnist-mini", "--profile", "{bad_yaml}", "--out", "o"], "unknown key 'batch.maxx' (line 3)"),
    (["compress", "{sd}", "--data", "mnist-mini", "--out", "o"], "--arch"),
    (["compress", "{sd}", "--arch", "resnet9000", "--data", "mnist-mini", "--out", "o"], "known: "),
    (["compress", "{teacher}", "--data", "{cifar10}", "--out", "o"], "10 outputs (classes in its metadata) but the data has 3 classes"),
    (["profiles", "show", "nope"], "unknown profile"),
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
