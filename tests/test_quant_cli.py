"""`kdtoolkit quantize` and stage 05-quantize write their artifact through one function
(kdtoolkit.quant.artifact.write_quantized), so their manifests have the same shape."""

from __future__ import annotations

import inspect
import json

import pytest

from tests.conftest import run_cli

INFO_KEYS = {"model", "opset", "input", "output", "precision", "quantization"}
METRIC_KEYS = {"accuracy_fp32", "accuracy_int8", "accuracy_drop_points", "n_test", "kept_in_float", "precision", "precision_reason",
               "precision_decided_at_batch", "accuracy_runtime", "precision_latency_ms", "int8_speedup", "stage_wall_s"}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    import torch

    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.zoo import small_cnn

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("qcli")
    return export_onnx(small_cnn(10, 1, width=0.25).eval(), (1, 1, 28, 28), d / "fp32.onnx")


def test_quantize_command_writes_the_stage_manifest_shape(tmp_path, fp32):
    out = tmp_path / "q"
    r = run_cli("quantize", str(fp32), "--data", "mnist-mini", "--out", str(out), "--calib-size", "64")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out / 'model.onnx'} (INT8 QDQ, scheme ")
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "quantize" and man["kind"] == "onnx"
    assert INFO_KEYS <= set(man["info"]) and METRIC_KEYS <= set(man["metrics"])
    m = man["metrics"]
    # the command makes INT8 as asked: shipped even when slower, and the recorded reason says who asked
    assert m["precision"] == man["info"]["precision"] == "int8"
    assert m["precision_reason"].startswith("kdtoolkit quantize asks for int8")
    assert {"model.onnx", "int8.onnx"} <= set(man["files"])
    assert (out / "model.onnx").read_bytes() == (out / "int8.onnx").read_bytes()
    assert man["info"]["input"]["shape"][1:] == [1, 28, 28]


def test_quantize_command_and_stage_write_the_same_keys(tmp_path, fp32):
    """The stage's call (profile policy, run's measure config) and the command's give the same manifest keys."""
    from kdtoolkit.config import Int8Config, MeasureConfig
    from kdtoolkit.data import load_data
    from kdtoolkit.quant.artifact import write_quantized
    from kdtoolkit.targets import load_profile

    splits = load_data("mnist-mini", train_limit=500, test_limit=300)
    prof = load_profile("ort-cpu")
    cfg = Int8Config(calib_size=64, tolerance_points=prof.accuracy_tolerance)
    kw = {"info": {"model": splits.spec.to_dict()}, "measure": MeasureConfig(batches=[1, 8], warmup=1, iters=5)}
    stage_like = write_quantized(tmp_path / "stage", fp32, splits, prof, cfg, config={"who": "stage"}, **kw)
    command = write_quantized(tmp_path / "cmd", fp32, splits, prof, cfg, config={"who": "cli"}, policy="int8",
                              asked_by="kdtoolkit quantize", **kw)
    assert set(stage_like.info) == set(command.info) and INFO_KEYS <= set(command.info)
    assert set(stage_like.metrics) == set(command.metrics) and METRIC_KEYS <= set(command.metrics)
    assert set(stage_like.manifest.files) == set(command.manifest.files) == {"model.onnx", "int8.onnx"}
    assert stage_like.metrics["precision_reason"] and stage_like.metrics["precision_decided_at_batch"] == prof.batch.opt
    shipped = stage_like.file("model.onnx").read_bytes()
    assert (shipped == stage_like.file("int8.onnx").read_bytes()) == (stage_like.metrics["precision"] == "int8")


def test_quantize_command_and_stage_call_write_quantized(tmp_path, fp32, monkeypatch):
    from typer.testing import CliRunner

    import kdtoolkit.quant.artifact as qa
    from kdtoolkit import stages
    from kdtoolkit.cli import app

    calls = []

    def spy(out_dir, *a, **kw):
        calls.append(kw)
        raise SystemExit(0)

    monkeypatch.setattr(qa, "write_quantized", spy)
    r = CliRunner().invoke(app, ["quantize", str(fp32), "--data", "mnist-mini", "--out", str(tmp_path / "q"), "--calib-size", "32"])
    assert r.exit_code == 0 and len(calls) == 1 and calls[0]["policy"] == "int8"
    src = inspect.getsource(stages.quantize_stage)
    assert "write_quantized(" in src and "ArtifactWriter" not in src
