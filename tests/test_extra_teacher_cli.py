"""`kdtoolkit distill --extra-teacher`: the second teacher is really in the loss.

Teachers and student are networks with all weights zero and a head bias, so each outputs fixed
logits on every image; with --alpha 1 the first step's loss is T^2 x the teacher-weighted KL
between fixed distributions, which is computed here by hand. A run that ignored the extra
teacher would report the single-teacher value instead.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from helpers import np_kl, pixel_splits, save_constant_cnn, save_npz

A = [2.0, 0.0, 0.0, 0.0]  # first teacher
B = [0.0, 0.0, 0.0, 3.0]  # extra teacher: confident in another class
S = [0.0, 0.0, 0.0, 0.0]  # student
T = 2.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("extra_teacher")
    splits = pixel_splits("constant")
    spec = splits.spec
    return {"d": d, "data": save_npz(d / "data.npz", splits), "a": save_constant_cnn(d / "a.pt", A, spec),
            "b": save_constant_cnn(d / "b.pt", B, spec), "s": save_constant_cnn(d / "s.pt", S, spec)}


def _first_step_loss(files, out, *extra: str) -> float:
    r = run_cli("distill", str(files["a"]), str(files["s"]), "--data", str(files["data"]), "--out", str(out), "--alpha", "1",
                "-T", str(T), "--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and history[0]["step"] == 1
    return history[0]["train_loss"]


def test_extra_teacher_enters_the_loss_with_equal_weight(files, tmp_path) -> None:
    single = T**2 * np_kl(A, S, T)
    both = T**2 * (np_kl(A, S, T) + np_kl(B, S, T)) / 2
    assert abs(both - single) > 0.1  # the premise: the two values are far apart
    got = _first_step_loss(files, tmp_path / "two", "--extra-teacher", str(files["b"]))
    assert got == pytest.approx(both, rel=1e-5)
    # the extra teacher's outputs were computed and cached beside the first one's
    cached = sorted(tmp_path.glob(".two.work-*/teacher1_logits.npy"))
    assert len(cached) == 1
    assert np.allclose(np.load(cached[0]), np.array(B, np.float32), atol=1e-6)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["info"]["teachers"][1].endswith("b.pt")


def test_extra_teacher_with_fixed_weights(files, tmp_path) -> None:
    """--teacher-weights 1,3: the KL terms are weighted 1/4 and 3/4."""
    got = _first_step_loss(files, tmp_path / "w", "--extra-teacher", str(files["b"]), "--teacher-weights", "1,3")
    assert got == pytest.approx(T**2 * (0.25 * np_kl(A, S, T) + 0.75 * np_kl(B, S, T)), rel=1e-5)


def test_extra_teacher_control_single_teacher_loss(files, tmp_path) -> None:
    """The same command without --extra-teacher gives the one-teacher value (so the tests above measure the flag)."""
    assert _first_step_loss(files, tmp_path / "one") == pytest.approx(T**2 * np_kl(A, S, T), rel=1e-5)
