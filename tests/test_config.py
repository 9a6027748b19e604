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
    with pytest.raises(InputError, match=r"train\.loss\.name: .*unknown loss 'kdd'; known: ce, dist, dkd, kd, multi_kd"):
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


def test_apply_overrides_dotted_and_validated():
    from kdtoolkit.config import CompressConfig, DataConfig, TrainConfig, apply_overrides
    from kdtoolkit.errors import InputError

    cfg = CompressConfig(model="m.pt", data=DataConfig(source="mnist-mini"))
    got = apply_overrides(cfg, ["train.lr=0.01", "train.loss.temperature=2", "student.skip=[a, b]", "train.lr_scales.head=0.1"])
    assert got.train.lr == 0.01 and got.train.loss.temperature.start == 2.0 and got.student.skip == ["a", "b"]
    assert got.train.lr_scales == {"head": 0.1} and cfg.train.lr == 0.05  # the original is untouched
    with pytest.raises(InputError, match=r"--set train\.lrr: .*no such setting"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(InputError, match=r"--set train\.lr: Input should be a valid number"):
        apply_overrides(cfg, ["train.lr=fast"])
    with pytest.raises(InputError, match="KEY=VALUE"):
        apply_overrides(cfg, ["train.lr"])
    assert apply_overrides(TrainConfig(), ["train.epochs=5", "mixup=0.2"], prefix="train").epochs == 5


def test_set_option_on_compress_refuses_unknown_key_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdtoolkit", "compress", str(tmp_path / "missing.pt"), "--data", "mnist-mini",
                        "--out", str(tmp_path / "run"), "--set", "train.lrr=0.1"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --set train.lrr"), r.stderr
    assert not (tmp_path / "run").exists()
