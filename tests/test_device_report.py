"""The on-device report: the standalone script's pure parts (no TensorRT here), verify's read-only check, gate's stored side.

The TensorRT part of deploy/device_report.py runs under `pytest -m tensorrt` (test at the end).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_deploy_{name}", DEPLOY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dr = _load("device_report")


@pytest.mark.parametrize("name", ["device_report", "trt_device", "infer_tensorrt"])
def test_device_scripts_are_python_3_8_syntax_and_import_no_tensorrt_at_load(name):
    src = (DEPLOY / f"{name}.py").read_text()
    ast.parse(src, feature_version=(3, 8))  # no walrus-free check needed beyond the grammar: match, except*, etc. fail here
    assert ":=" not in src and "removeprefix" not in src and "removesuffix" not in src
    tree = ast.parse(src)
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("tensorrt" in ast.dump(n) or "pycuda" in ast.dump(n) or "cuda" == getattr(n, "module", "") for n in top)


def test_device_report_imports_without_tensorrt():
    # in a fresh interpreter: importing the device script must not load TensorRT or a CUDA binding
    code = ("import sys; sys.path.insert(0, %r); import device_report; "
            "bad = [m for m in ('tensorrt', 'pycuda', 'cuda') if m in sys.modules]; assert not bad, bad; print(device_report.SCHEMA)") % str(DEPLOY)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stdout.strip() == "kdtoolkit.device-report/1"


def test_argument_parsing():
    a = dr.parse_args(["b", "--data", "d.npz", "--iters", "50", "--batch", "1", "--batch", "8"])
    assert (a.bundle, a.data, a.iters, a.batch, a.engine, a.rebuild) == ("b", "d.npz", 50, [1, 8], None, False)
    with pytest.raises(SystemExit):
        dr.parse_args(["b", "--iters", "2"])
    with pytest.raises(SystemExit):
        dr.parse_args(["b", "--engine", "x.plan", "--rebuild"])


def test_jetson_probes_parse_what_the_tools_print():
    assert dr.parse_l4t("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64") == "36.4.0"
    assert dr.parse_l4t("") is None and dr.jetpack_from_l4t("35.4.1") == "5.1.2" and dr.jetpack_from_l4t("36.3.0") == "6.0"
    assert dr.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert dr.parse_nvpmodel("") is None


def test_report_hash_ignores_only_its_own_field():
    doc = {"schema": dr.SCHEMA, "b": [1, 2], "a": {"x": 1.5}}
    h = dr.report_sha256(doc)
    assert h == dr.report_sha256({**doc, "sha256": "whatever"})
    assert h != dr.report_sha256({**doc, "b": [1, 3]})
    from kdtoolkit.backends.device_report import canonical

    assert hashlib.sha256(canonical(doc)).hexdigest() == h  # kdtoolkit's verify and the script agree on the bytes


def test_batching_for_static_and_dynamic_engines():
    assert dr.batches_for(5, 1, 1, True) == [(i, i + 1, 1) for i in range(5)]
    assert dr.batches_for(5, 1, 4, False) == [(0, 4, 4), (4, 5, 1)]
    assert dr.batches_for(3, 2, 2, True) == [(0, 2, 2), (2, 3, 2)]
    seen = []
    out = dr.run_batched(lambda x: (seen.append(len(x)), x[:, :2].sum(axis=(2, 3)))[1], np.ones((3, 2, 2, 2), np.float32), 2, 2, True)
    assert seen == [2, 2] and out.shape == (3, 2)  # padded to the static batch, the padding dropped again


def test_compare_outputs_and_latency_stats():
    want = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    ok = dr.compare_outputs(want + 0.01, want, {"atol": 0.05, "rtol": 0.0})
    assert ok["passed"] and ok["top1_agree"] == 2
    bad = dr.compare_outputs(want[::-1], want, {"atol": 0.05, "rtol": 0.0})
    assert not bad["passed"] and bad["top1_agree"] == 0
    st = dr.latency_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st["p50"] == 3.0 and st["n"] == 5 and st["min"] == 1.0


def test_preprocessing_follows_the_manifest_formula():
    pre = {"mean": [0.5], "std": [0.25], "scale": 1 / 255}
    x = dr.preprocess_uint8(np.full((2, 4, 4), 255, np.uint8), pre)
    assert x.shape == (2, 1, 4, 4) and np.allclose(x, 2.0)


def test_build_settings_derived_without_on_device_build():
    m = {"on_device": {}, "profile": {"precision": "auto", "batch": {"min": 1, "opt": 4, "max": 8},
                                      "tensorrt": {"dla_core": None, "workspace_mb": 512}},
         "model": {"qdq": False}, "inputs": [{"name": "input", "shape": ["batch", 3, 8, 8]}], "runtime": {"onnx": "model/model.onnx"}}
    b = dr.build_settings(m)
    assert b["precision"] == "fp16" and b["shapes"]["input"] == {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}
    m["model"]["qdq"] = True
    assert dr.build_settings(m)["precision"] == "int8"


def test_trt_device_binding_check_and_missing_tensorrt_are_clear():
    td = _load("trt_device")
    assert td.binding_fits_driver("13.0.0", 12060) and td.binding_fits_driver("12.6.0", 12060) is None
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(td.DeviceError, match="TensorRT's Python package is not importable"):
            td.import_tensorrt()


# ------------------------------------------------------------------ verify and gate on a bundle with a device report

@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory, tiny_teacher) -> Path:
    """A real, small jetson-agx-orin-dla compress run (no TensorRT here): its bundle is what a Jetson receives."""
    from kdtoolkit.distill.trainer import TrainConfig
    from kdtoolkit.pipeline import CompressConfig, DataConfig, MeasureConfig, compress

    out = tmp_path_factory.mktemp("dla-run") / "run"
    cfg = CompressConfig(model=str(tiny_teacher), data=DataConfig(source="mnist-mini", train_limit=600, test_limit=100),
                         profile="jetson-agx-orin-dla", train=TrainConfig(epochs=1, batch_size=128, lr=0.05, seed=0),
                         measure=MeasureConfig(batches=[1], warmup=2, iters=5))
    compress(cfg, out, progress=False)
    return out / "bundle"


def test_dla_bundle_ships_the_cache_the_qdq_free_onnx_and_the_device_script(trt_bundle):
    m = json.loads((trt_bundle / "manifest.json").read_text())
    assert {"model/calibration.cache", "model/model_noqdq.onnx", "deploy/device_report.py", "deploy/trt_device.py"} <= set(m["files"])
    b = m["on_device"]["build"]
    assert b["onnx"] == "model/model_noqdq.onnx" and b["calibration_cache"] == "model/calibration.cache" and b["dla_core"] == 0
    cmds = m["on_device"]["commands"]
    assert "--calib-cache model/calibration.cache" in cmds["kdtoolkit_build"]
    assert "--calib=model/calibration.cache" in cmds["trtexec_build"] and "workspace:1024 " in cmds["trtexec_build"]
    assert "--calib-data" not in cmds["kdtoolkit_build"]
    assert "device_report.json" in m["on_device"]["statement"]


def _fake_device_report(bundle: Path, *, passed=True, samples=None) -> dict:
    """What deploy/device_report.py writes, with figures made up for the test (never shipped anywhere)."""
    m = json.loads((bundle / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    doc = {"schema": dr.SCHEMA, "created": "2025-01-01T00:00:00+00:00",
           "bundle": {"name": m["name"], "manifest_sha256": hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest(),
                      "profile": m["profile"]["name"], "onnx": "model/model_noqdq.onnx",
                      "onnx_sha256": m["files"]["model/model_noqdq.onnx"]["sha256"]},
           "engine": {"file": "model/model.plan", "sha256": hashlib.sha256(b"plan").hexdigest(), "bytes": 4, "built_here": True,
                      "build": None, "batch_range": [1, 1]},
           "environment": {"gpu": "Orin (test)", "compute_capability": "8.7", "tensorrt": "8.6.2", "cuda_binding": "pycuda",
                           "jetson": {"l4t": "36.3.0", "jetpack": "6.0", "power_mode": "MAXN"}, "machine": "aarch64"},
           "reference": {"passed": passed, "max_abs_diff": 0.01, "top1_agree": 16 if passed else 3, "n": 16},
           "accuracy": {"top1": 0.5, "n": 100},
           "latency_ms": {"runtime": "tensorrt", "iters": 20, "warmup": 5,
                          "by_batch": {"1": {"p50": 1.0, "samples_ms": samples or list(1.0 + 0.01 * rng.random(20))}}}}
    (bundle / "model" / "model.plan").write_bytes(b"plan")
    doc["sha256"] = dr.report_sha256(doc)
    dr.write_json_atomic(str(bundle / "device_report.json"), doc)
    return doc


def test_verify_checks_the_device_report_read_only(trt_bundle, tmp_path):
    from kdtoolkit.bundle import verify_bundle
    from kdtoolkit.errors import CheckFailed

    b = tmp_path / "b"
    shutil.copytree(trt_bundle, b)
    _fake_device_report(b)
    before = {p: p.stat().st_mtime_ns for p in b.rglob("*") if p.is_file()}
    lines = []
    verify_bundle(b, runtime="onnxruntime", emit=lines.append)
    assert any(line.startswith("OK   device report sha256") for line in lines)
    assert any(line.startswith("OK   device report is for this bundle") for line in lines)
    assert any(line.startswith("OK   device reference outputs (TensorRT 8.6.2 on Orin (test))") for line in lines)
    assert before == {p: p.stat().st_mtime_ns for p in b.rglob("*") if p.is_file()}  # read-only
    # tampering with the report, or a report from another bundle, fails verify
    doc = json.loads((b / "device_report.json").read_text())
    doc["latency_ms"]["by_batch"]["1"]["p50"] = 0.1
    (b / "device_report.json").write_text(json.dumps(doc))
    with pytest.raises(CheckFailed, match="device report sha256"):
        verify_bundle(b, runtime="onnxruntime", emit=lambda s: None)
    _fake_device_report(b)
    (b / "model" / "model.plan").write_bytes(b"other plan")
    with pytest.raises(CheckFailed, match="device report engine"):
        verify_bundle(b, runtime="onnxruntime", emit=lambda s: None)
    _fake_device_report(b, passed=False)
    with pytest.raises(CheckFailed, match="device reference outputs"):
        verify_bundle(b, runtime="onnxruntime", emit=lambda s: None)


def test_gate_takes_the_device_report_as_a_stored_side(trt_bundle, tmp_path):
    from kdtoolkit.gate import GateSettings, run_gate

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(trt_bundle, a)
    shutil.copytree(trt_bundle, b)
    _fake_device_report(a)
    _fake_device_report(b, samples=[2.0 + 0.01 * i for i in range(20)])
    r = run_gate(str(b / "device_report.json"), str(a), GateSettings(max_accuracy_drop=None))
    assert r.mode == "stored" and r.verdict == "regression" and r.checks[0]["batch"] == 1
    r = run_gate(str(a), str(a / "device_report.json"), GateSettings(max_accuracy_drop=None))
    assert r.verdict == "pass"


def test_cli_gate_with_a_device_report_side(trt_bundle, tmp_path):
    from conftest import run_cli

    a = tmp_path / "a"
    shutil.copytree(trt_bundle, a)
    _fake_device_report(a)
    r = run_cli("gate", str(a / "device_report.json"), "--baseline", str(a / "device_report.json"))
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": dr.SCHEMA, "latency_ms": {"by_batch": {}}}))
    r = run_cli("gate", str(bad), "--baseline", str(a / "device_report.json"))
    assert r.returncode == 2 and "no latency measured" in r.stderr


@pytest.mark.tensorrt
def test_device_report_script_on_a_real_device(trt_bundle, tmp_path):
    """On a machine with TensorRT and a GPU: the script builds the bundle's engine and writes a report verify accepts."""
    import subprocess

    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "Builder"):
        pytest.skip("only tensorrt type stubs are installed here, not TensorRT")
    td = _load("trt_device")
    try:
        td.cuda_adapter()
    except td.DeviceError as exc:
        pytest.skip(f"no usable CUDA here: {exc}")
    b = tmp_path / "b"
    shutil.copytree(trt_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    if m["on_device"]["build"].get("dla_core") is not None:
        m["on_device"]["build"]["dla_core"] = None  # a desktop GPU has no DLA; the build settings are otherwise the bundle's
        (b / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, str(b / "deploy" / "device_report.py"), str(b), "--iters", "20", "--warmup", "5"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode in (0, 1), r.stderr
    doc = json.loads((b / "device_report.json").read_text())
    assert doc["sha256"] == dr.report_sha256(doc) and doc["engine"]["built_here"] is True
    assert len(doc["latency_ms"]["by_batch"]["1"]["samples_ms"]) == 20


def test_cuda_adapter_moves_on_from_a_binding_that_does_not_fit(monkeypatch):
    """Issue 15.9: a cuda-python too new for the driver is skipped with its reason, not only on ImportError."""
    td = _load("trt_device")

    class TooNew:
        def __init__(self):
            raise td.DeviceError(td.binding_fits_driver("13.0.0", 12060))

    class Works:
        name = "works"

    monkeypatch.delenv("KDTOOLKIT_CUDA_BACKEND", raising=False)
    monkeypatch.setattr(td, "BINDINGS", {"cuda-python": TooNew, "pycuda": Works})
    assert isinstance(td.cuda_adapter(), Works)
    monkeypatch.setattr(td, "BINDINGS", {"cuda-python": TooNew})
    with pytest.raises(td.DeviceError, match=r"cuda-python: cuda-python 13.0.0 needs a CUDA 13 driver.*cuda-python>=12.6,<13"):
        td.cuda_adapter()


def test_bundled_test_subset_is_what_the_device_report_scores(trt_bundle, tmp_path):
    """`bundle --test-subset N` packs seeded test images with ORT's top-1 on exactly them; the device script reads
    them by default and compares like for like (the TensorRT part itself needs a device)."""
    import json

    import numpy as np
    from conftest import run_cli

    from kdtoolkit.backends.ort import make_session

    run, out = trt_bundle.parent, tmp_path / "b"
    r = run_cli("bundle", str(run), "--out", str(out), "--test-subset", "80")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    sub = m["test_subset"]
    assert sub["images"] == 80 and sub["path"] == "testset/test.npz" and sub["path"] in m["files"]
    dr = _load("device_report")
    x, y, what = dr.load_data(str(out / sub["path"]), m)
    assert x.shape[0] == 80 and x.dtype == np.float32 and "npz" in what
    sess = make_session(str(out / "model" / "model.onnx"))
    top1 = float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())
    assert top1 == pytest.approx(sub["onnxruntime_top1"])  # the bundle's preprocessing formula reproduces kdtoolkit's
    assert run_cli("verify", str(out)).returncode == 0
    (out / sub["path"]).write_bytes(b"tampered")
    assert run_cli("verify", str(out)).returncode != 0


def test_device_data_folder_with_an_unreadable_image_is_one_line(tmp_path):
    from PIL import Image

    manifest = {"classes": ["a", "b"], "preprocessing": {"input_size": [8, 8], "color": "RGB", "scale": 1 / 255,
                                                         "mean": [0.5] * 3, "std": [0.25] * 3, "layout": "NCHW"}}
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / c / "ok.png")
    x, y, what = dr.load_data(str(tmp_path), manifest)
    assert x.shape == (2, 3, 8, 8) and list(y) == [0, 1]
    (tmp_path / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match=r"broken\.png: cannot read image \(UnidentifiedImageError\)"):
        dr.load_data(str(tmp_path), manifest)
