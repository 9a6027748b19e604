"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent) and tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KDTOOLKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} is not present (the shared data folder lives beside the checkout; see README)")
    return p


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # decoded datasets are cached per user; tests share one cache outside the checkout
    os.environ.setdefault("KDTOOLKIT_CACHE", str(Path.home() / ".cache" / "kdtoolkit"))
    yield


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The CIFAR-10 JPEG archive unpacked once into the cache (not into the checkout)."""
    from kdtoolkit.data.datasets import _find_root, extract_archive

    return _find_root(extract_archive(shared_file("cifar10-jpeg.tar.gz")))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A small CNN checkpoint (recipe + weights) for mnist-mini: fast enough for CLI tests."""
    import torch

    from kdtoolkit.data import load_data
    from kdtoolkit.models.loading import save_checkpoint
    from kdtoolkit.models.zoo import small_cnn

    torch.manual_seed(0)
    spec = load_data("mnist-mini").spec
    model = small_cnn(num_classes=10, in_channels=1, width=0.25)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    recipe = {"arch": "small_cnn", "arch_kwargs": {"num_classes": 10, "in_channels": 1, "width": 0.25}, "transforms": []}
    save_checkpoint(path, model, recipe, spec.to_dict())
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kdtoolkit", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
