"""kdtoolkit.config: torch-free, one home for every configuration, names checked when read."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_config_imports_no_torch():
    code = "import kdtoolkit.config, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_names_still_importable():
    from kdtoolkit import config, pipeline
    from kdtoolkit.distill import trainer
    from kdtoolkit.student import build

    assert pipeline.CompressConfig is config.CompressConfig and pipeline.load_config is config.load_config
    assert trainer.TrainConfig is config.TrainConfig and trainer.LossConfig is config.LossConfig
    assert build.StudentConfig is config.StudentConfig


def test_loss_names_match_registry():
    from kdtoolkit.config import LOSS_NAMES
    from kdtoolkit.distill.losses import LOSSES

    assert sorted(LOSS_NAMES) == LOSSES.names()


def test_unknown_loss_refused_when_read(tmp_path):
    from kdtoolkit.config import load_config
    from kdtoolkit.errors import InputError

    p = tmp_path / "config.yaml"
    p.write_text("model: m.pt\ndata: {source: mnist-mini}\ntrain: {loss: {name: kdd}}\n")
    with pytest.raises(InputError, match=r"train\.loss\.name: .*unknown loss 'kdd'; known: ce, kd, multi_kd"):
        load_config(p)


def test_config_roundtrip(tmp_path):
    from kdtoolkit.config import CompressConfig, DataConfig, load_config, save_config

    cfg = CompressConfig(model="m.pt", data=DataConfig(source="mnist-mini"))
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_input_spec_from_meta():
    from kdtoolkit.data.inputspec import InputSpec

    s = InputSpec.from_meta({"channels": 3, "input_size": [32, 32], "mean": [0.5] * 3, "std": [0.2] * 3, "classes": [1, 2]})
    assert s.shape == (3, 32, 32) and s.mean == (0.5,) * 3 and s.classes == ["1", "2"] and s.source["mean"] == "model"
    assert InputSpec.from_meta(None).shape is None
