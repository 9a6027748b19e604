"""`torchrun --nproc_per_node 2 -m kdtoolkit distill` on CPU (gloo) equals one process with the global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import run_cli

ARGS = ["--student-arch", "small_cnn", "--student-width", "0.25", "--data", "mnist-mini", "--train-limit", "240",
        "--test-limit", "40", "--epochs", "1", "--max-steps", "4", "--checkpoint-every", "2", "--quiet"]


def test_two_gloo_processes_match_one_process(tiny_teacher, tmp_path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "KDTOOLKIT_CPU": "1"}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "kdtoolkit", "distill", str(tiny_teacher),
                        "--out", str(tmp_path / "ddp"), "--batch-size", "16", *ARGS],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 writes
    one = run_cli("distill", str(tiny_teacher), "--out", str(tmp_path / "one"), "--batch-size", "32", *ARGS)
    assert one.returncode == 0, one.stderr
    a = torch.load(next(tmp_path.glob(".ddp.work-*/last.pt")), weights_only=True)
    b = torch.load(next(tmp_path.glob(".one.work-*/last.pt")), weights_only=True)
    assert a["step"] == b["step"] == 4
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in b["model"])
    assert diff < 1e-4, diff
    assert a["model"]["features.1.running_var"].ne(1).any()  # BatchNorm really trained (synchronised), not frozen
