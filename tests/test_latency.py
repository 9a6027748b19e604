"""Profiling: runners chosen by file/artifact type, interleaved measurement, the profile JSON and CLI.

Real ONNX Runtime and torch runs on tiny models with few iterations; no assertions on absolute speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from kdtoolkit.errors import InputError, KdtError


def _tiny(width: float, path: Path, *, dynamic: bool = True) -> Path:
    import torch

    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.zoo import small_cnn

    torch.manual_seed(0)
    m = small_cnn(num_classes=10, in_channels=1, width=width)
    m.train()
    with torch.no_grad():  # BatchNorm statistics from data-like batches: realistic activations, no denormals
        for _ in range(3):
            m(torch.randn(16, 1, 28, 28))
    return export_onnx(m.eval(), (1, 1, 28, 28), path, dynamic_batch=dynamic)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("onnx")
    return {"small": _tiny(0.25, d / "small.onnx"), "big": _tiny(1.0, d / "big.onnx"),
            "static": _tiny(0.25, d / "static.onnx", dynamic=False)}


def test_measure_interleaves_and_summarises(tiny_onnx):
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.latency.timing import measure

    with OrtRunner(tiny_onnx["small"], name="a") as a, OrtRunner(tiny_onnx["big"], name="b") as b:
        res = measure([a, b], [1, 4], warmup=2, iters=12)
    for name in ("a", "b"):
        for bs in (1, 4):
            s = res[name][bs]
            assert s["n"] == 12 and len(s["samples_ms"]) == 12
            assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"]
            assert s["std"] >= 0 and s["throughput_per_s"] == pytest.approx(bs * 1000 / s["p50"])
            assert s["mem_bytes"] is None or s["mem_bytes"] >= 0


def test_time_budget_stops_rounds(tiny_onnx):
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.latency.timing import measure

    with OrtRunner(tiny_onnx["small"], name="a") as a:
        res = measure([a], [1], warmup=1, time_budget_s=0.05)
    assert res["a"][1]["n"] >= 5


def test_load_runner_by_type(tiny_onnx, tmp_path):
    import torch

    from kdtoolkit.artifact import ArtifactWriter
    from kdtoolkit.backends.factory import load_runner
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.backends.pytorch import TorchRunner
    from kdtoolkit.models.loading import save_checkpoint
    from kdtoolkit.models.zoo import small_cnn

    r = load_runner(tiny_onnx["small"])
    assert isinstance(r, OrtRunner) and r.describe()["allow_spinning"] is False
    with ArtifactWriter(tmp_path / "onnx-art", kind="onnx", stage="export") as w:
        w.path("model.onnx").write_bytes(tiny_onnx["small"].read_bytes())
    assert isinstance(load_runner(tmp_path / "onnx-art"), OrtRunner)

    recipe = {"arch": "small_cnn", "arch_kwargs": {"num_classes": 10, "in_channels": 1, "width": 0.25}, "transforms": []}
    ckpt = save_checkpoint(tmp_path / "m.pt", small_cnn(10, 1, 0.25), recipe, {"input_size": [28, 28], "channels": 1})
    tr = load_runner(ckpt)
    assert isinstance(tr, TorchRunner) and tr.input_shape() == ("batch", 1, 28, 28)
    out = tr.run(__import__("numpy").zeros((2, 1, 28, 28), "float32"))
    assert tuple(out.shape) == (2, 10)
    bare = tmp_path / "bare.pt"
    torch.save(small_cnn(10, 1).state_dict(), bare)
    with pytest.raises(InputError, match="--input-shape"):
        load_runner(bare, arch="small_cnn")
    assert load_runner(bare, arch="small_cnn", input_shape=(1, 28, 28)).input_shape() == ("batch", 1, 28, 28)

    with pytest.raises(InputError, match="unknown model type"):
        load_runner(_touch(tmp_path / "x.txt"))
    with pytest.raises(InputError, match="not found"):
        load_runner(tmp_path / "missing.onnx")


def _touch(p: Path) -> Path:
    p.write_text("x")
    return p


def test_engine_without_tensorrt_is_a_clear_error(tmp_path):
    from kdtoolkit.backends.factory import load_runner

    plan = tmp_path / "model.engine"
    plan.write_bytes(b"\0" * 64)
    with pytest.raises(KdtError) as e:
        load_runner(plan)
    assert "tensorrt" in str(e.value).lower()


def test_batch_outside_model_is_rejected_before_timing(tiny_onnx):
    from kdtoolkit.backends.ort import OrtRunner
    from kdtoolkit.latency.timing import measure

    with OrtRunner(tiny_onnx["static"], name="s") as s, pytest.raises(InputError, match="batch 8 is outside"):
        measure([s], [8], warmup=0, iters=5)


def test_profile_cli_table_and_json(tiny_onnx, tmp_path):
    out = tmp_path / "p.json"
    r = run_cli("profile", str(tiny_onnx["small"]), str(tiny_onnx["big"]), "--batch", "1,2", "--iters", "8", "--warmup", "1",
                "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "p50 / small" in r.stdout and "big" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "kdtoolkit.profile/1" and doc["settings"]["interleaved"] is True
    assert doc["settings"]["batches"] == [1, 2] and doc["environment"]["cpu"]["model"]
    assert doc["environment"]["onnxruntime"] and "threads" in doc["environment"]
    assert len(doc["results"]["big"]["2"]["samples_ms"]) == 8
    assert doc["models"]["small"]["runner"] == "onnxruntime"
    from kdtoolkit.latency.session import load_profile_json

    assert load_profile_json(out)["results"].keys() == {"small", "big"}


def test_profile_cli_bad_input_exit_2(tiny_onnx, tmp_path):
    r = run_cli("profile", str(tiny_onnx["static"]), "--batch", "8", "--iters", "5")
    assert r.returncode == 2 and "batch 8 is outside" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("profile", str(tmp_path / "nope.onnx"))
    assert r.returncode == 2 and "not found" in r.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    r = run_cli("profile", str(bad), "--iters", "5")
    assert r.returncode == 2 and "cannot load" in r.stderr
    r = run_cli("profile", str(tiny_onnx["small"]), "--iters", "5", "--time-budget", "1")
    assert r.returncode == 2


def test_profile_json_validation(tmp_path):
    from kdtoolkit.latency.session import load_profile_json

    for text, msg in (("", "empty"), ('{"schema": "kdtoolkit.profile/1", "res', "not valid JSON"), ("[1]", "expected a JSON object"),
                      ('{"schema": "other/9", "results": {}}', "unsupported profile schema"),
                      ('{"results": {"a": {"1": {"p50": 1}}}, "environment": {}}', "samples_ms")):
        p = tmp_path / "x.json"
        p.write_text(text)
        with pytest.raises(InputError, match=msg):
            load_profile_json(p)
