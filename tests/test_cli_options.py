"""Options derived from the configs: help text = the Field description, type and default from the model,
--help panels named after the config they set (kdtoolkit.cli.options.config_option)."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from kdtoolkit.cli import app
from kdtoolkit.cli.options import config_default, config_help, config_option, config_panel
from kdtoolkit.config import DataConfig, Int8Config, MeasureConfig, QatConfig, StudentConfig, TrainConfig


def _click_params(command: str) -> dict[str, object]:
    """{option name: click parameter} of one kdtoolkit command, as typer builds it."""
    cmd = typer.main.get_command(app).commands[command]
    return {name: p for p in cmd.params for name in p.opts}


@pytest.mark.parametrize("command,flag,model,field", [
    ("distill", "--lr", TrainConfig, "lr"),
    ("distill", "--epochs", TrainConfig, "epochs"),
    ("distill", "--batch-size", TrainConfig, "batch_size"),
    ("distill", "--val-fraction", DataConfig, "val_fraction"),
    ("finetune", "--weight-decay", TrainConfig, "weight_decay"),
    ("compress", "--lr", TrainConfig, "lr"),
    ("compress", "--max-steps", TrainConfig, "max_steps"),
    ("compress", "--student-arch", StudentConfig, "arch"),
    ("compress", "--speedup", StudentConfig, "speedup"),
    ("compress", "--train-limit", DataConfig, "train_limit"),
    ("compress", "--iters", MeasureConfig, "iters"),
    ("quantize", "--percentile", Int8Config, "percentile"),
])
def test_option_help_is_the_config_field_description(command, flag, model, field):
    p = _click_params(command)[flag]
    assert p.help == model.model_fields[field].description
    assert p.rich_help_panel == config_panel(model)


def test_option_panels_are_named_after_the_configs():
    assert [config_panel(m) for m in (StudentConfig, TrainConfig, QatConfig, DataConfig, MeasureConfig)] == \
        ["Student", "Training", "Quantization", "Data", "Measurement"]
    c = _click_params("compress")
    assert c["--qat-steps"].rich_help_panel == "Quantization" and c["--depth"].rich_help_panel == "Student"
    assert c["--no-separable"].rich_help_panel == "Student" and c["--alpha"].rich_help_panel == "Training"
    assert c["--set"].rich_help_panel is None  # --set stays as it is, with the command's own options
    r = CliRunner().invoke(app, ["compress", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for panel in ("Student", "Training", "Quantization", "Data", "Measurement"):
        assert re.search(rf"─ {panel} ─", r.output), panel


def test_distill_defaults_and_types_come_from_the_config():
    d = _click_params("distill")
    for flag, field in (("--lr", "lr"), ("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--optimizer", "optimizer"),
                        ("--schedule", "schedule"), ("--grad-clip", "grad_clip"), ("--warmup", "warmup_steps")):
        assert d[flag].default == config_default(TrainConfig, field), flag
    # compress: unset options keep the config's value, so they default to None
    assert _click_params("compress")["--lr"].default is None


def test_option_help_is_derived_not_copied(monkeypatch):
    """Changing a Field description changes the help of the option built from it."""
    monkeypatch.setattr(TrainConfig.model_fields["lr"], "description", "the learning rate at the peak of the schedule")
    demo = typer.Typer()

    @demo.command()
    def train(lr: config_option(TrainConfig, "lr", optional=True) = None) -> None:  # evaluated when typer builds the command
        typer.echo(f"lr={lr}")

    params = {o: p for p in typer.main.get_command(demo).params for o in p.opts}
    assert params["--lr"].help == "the learning rate at the peak of the schedule" == config_help(TrainConfig, "lr")
    assert CliRunner().invoke(demo, ["--lr", "0.5"]).output.strip() == "lr=0.5"


def test_option_types_follow_the_field_annotation():
    assert config_option(TrainConfig, "lr").__origin__ is float
    assert config_option(TrainConfig, "max_steps").__origin__ == (int | None)
    assert config_option(TrainConfig, "optimizer").__origin__ is str  # a Literal: the config validates it
    assert "sgd or adamw" in config_help(TrainConfig, "optimizer")
    with pytest.raises(TypeError, match="--set"):
        config_option(TrainConfig, "lr_scales")
    with pytest.raises(KeyError, match="no field"):
        config_option(TrainConfig, "learning_rate")


def test_set_option_is_kept_on_compress_and_distill():
    for command in ("compress", "distill"):
        assert "--set" in _click_params(command)
