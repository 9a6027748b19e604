"""`kdtoolkit distill` / `finetune` as a user runs them: artifacts, resume after SIGKILL, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tests.conftest import run_cli

TINY = ["--train-limit", "240", "--test-limit", "60", "--batch-size", "16", "--quiet"]


def _one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_distill_writes_an_artifact_compress_can_take(tiny_teacher, tmp_path) -> None:
    out = tmp_path / "kd"
    r = run_cli("distill", str(tiny_teacher), "--student-arch", "small_cnn", "--student-width", "0.25", "--data", "mnist-mini",
                "--out", str(out), "--epochs", "1", "--max-steps", "3", "--alpha-end", "0.5", "-T", "4", "--temperature-end", "2",
                "--tensorboard", str(tmp_path / "tb"), *TINY)
    assert r.returncode == 0, r.stderr
    assert "test top-1" in r.stdout
    from kdtoolkit.artifact import Artifact
    from kdtoolkit.models.loading import load_model

    art = Artifact.load(out)
    assert art.kind == "torch" and art.manifest.stage == "distill"
    assert {"model.pt", "history.json", "metrics.jsonl"} <= set(art.manifest.files)
    assert 0 <= art.metrics["accuracy"] <= 1 and art.metrics["steps"] == 3 and "teacher_agreement" in art.metrics
    assert art.manifest.config["loss"]["temperature"] == {"start": 4.0, "end": 2.0, "kind": "linear"}
    loaded = load_model(out)  # what compress does with a teacher or student artifact
    assert loaded.recipe["arch"] == "small_cnn" and loaded.module(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # the second command: student given as the artifact just written, with hints + AT
    r = run_cli("distill", str(tiny_teacher), str(out), "--data", "mnist-mini", "--out", str(tmp_path / "kd2"), "--epochs", "1",
                "--max-steps", "2", "--hint-weight", "1", "--at-weight", "100", *TINY)
    assert r.returncode == 0, r.stderr
    assert set(_weights(tmp_path / "kd2" / "model.pt")) == set(_weights(out / "model.pt"))  # no adapter weights saved


def test_finetune_new_head_and_gradual_unfreezing(tiny_teacher, tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not a png at all")
    common = ["--num-classes", "3", "--epochs", "2", "--batch-size", "8", "--freeze-backbone", "--unfreeze-every", "1",
              "--backbone-lr-scale", "0.1", "--label-smoothing", "0.1", "--patience", "3", "--quiet"]
    r = run_cli("finetune", str(tiny_teacher), "--data", str(root), "--out", str(tmp_path / "ft"), *common)
    _one_line_error(r, 2, "broken.png", "--on-bad-image skip")
    assert not (tmp_path / "ft").exists()
    r = run_cli("finetune", str(tiny_teacher), "--data", str(root), "--out", str(tmp_path / "ft"), "--on-bad-image", "skip", *common)
    assert r.returncode == 0, r.stderr
    from kdtoolkit.artifact import Artifact
    from kdtoolkit.models.loading import load_model

    art = Artifact.load(tmp_path / "ft")
    assert art.metrics["head_replaced"] is True and art.info["head"] == "classifier"
    cfg = art.manifest.config
    assert cfg["freeze"] and cfg["unfreeze_every"] == 1 and cfg["lr_scales"] == {"": 0.1, "classifier": 1.0}
    m = load_model(tmp_path / "ft").module
    assert m(torch.zeros(1, 1, 28, 28)).shape == (1, 3)


def test_bad_inputs_one_line(tiny_teacher, tmp_path) -> None:
    from kdtoolkit.data import load_data
    from kdtoolkit.models.loading import save_checkpoint
    from kdtoolkit.models.zoo import small_cnn

    five = tmp_path / "five.pt"
    save_checkpoint(five, small_cnn(5, 1, 0.25), {"arch": "small_cnn", "arch_kwargs": {"num_classes": 5, "in_channels": 1, "width": 0.25}},
                    load_data("mnist-mini").spec.to_dict())
    base = ["--data", "mnist-mini", "--out", str(tmp_path / "o"), "--max-steps", "1", *TINY]
    _one_line_error(run_cli("distill", str(tiny_teacher), str(five), *base), 2, "teacher has 10 outputs but the student has 5")
    _one_line_error(run_cli("distill", str(tiny_teacher), "--student-arch", "small_cnn", "--hint-weight", "1", "--hints", "features.33", *base),
                    2, "'features.33' does not exist in the student", "close names")
    _one_line_error(run_cli("distill", str(tiny_teacher), "--student-arch", "small_cnn", *base, "--batch-size", "5000"),
                    2, "larger than the training split")
    assert not (tmp_path / "o").exists()


def test_nan_loss_exit_4_keeps_last_good_checkpoint(tiny_teacher, tmp_path) -> None:
    out = tmp_path / "nan"
    r = run_cli("finetune", str(tiny_teacher), "--data", "mnist-mini", "--out", str(out), "--lr", "1e30", "--grad-clip", "0",
                "--checkpoint-every", "1", "--augment", "none", "--epochs", "1", *TINY)
    _one_line_error(r, 4, "loss became", "last good checkpoint")
    assert not out.exists()
    (ckpt,) = tmp_path.glob(".nan.work-*/last.pt")
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] >= 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.dtype.is_floating_point)


def test_resume_after_sigkill_matches_uninterrupted(tiny_teacher, tmp_path) -> None:
    args = ["distill", str(tiny_teacher), "--student-arch", "small_cnn", "--student-width", "0.25", "--data", "mnist-mini",
            "--epochs", "2", "--checkpoint-every", "2", "--no-teacher-cache", "--alpha", "0.7", *TINY]
    ref = run_cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "kdtoolkit", *args, "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not list(tmp_path.glob(".run.work-*/last.pt")):
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and not out.exists()
    (ckpt,) = tmp_path.glob(".run.work-*/last.pt")
    assert torch.load(ckpt, weights_only=True)["step"] < 26
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    a, b = _weights(tmp_path / "ref" / "model.pt"), _weights(out / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    from kdtoolkit.artifact import Artifact

    ma, mb = Artifact.load(tmp_path / "ref").metrics, Artifact.load(out).metrics
    assert ma["accuracy"] == mb["accuracy"] and ma["best_val_accuracy"] == mb["best_val_accuracy"] and ma["steps"] == mb["steps"]
    last_a = torch.load(next(tmp_path.glob(".ref.work-*/last.pt")), weights_only=True)["model"]
    last_b = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


def test_ctrl_c_says_what_is_kept_and_exits_130(tiny_teacher, tmp_path) -> None:
    """Ctrl-C is what users press: one line saying the run resumes, exit 130 (Typer swallowed it silently)."""
    args = ["distill", str(tiny_teacher), "--student-arch", "small_cnn", "--student-width", "0.25", "--data", "mnist-mini",
            "--epochs", "30", "--checkpoint-every", "2", "--no-teacher-cache", *TINY]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "kdtoolkit", *args, "--out", str(tmp_path / "run")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not list(tmp_path.glob(".run.work-*/last.pt")):
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be interrupted"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-1000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: what finished is kept") and "Traceback" not in err
