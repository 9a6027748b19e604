"""The TensorRT builder and runner: type-checked against tensorrt-stubs here, and really built and run where TensorRT is.

Tests marked ``tensorrt`` need a real TensorRT and a CUDA GPU (the docker images in docker/ run them with
``pytest -m tensorrt``); the default addopts deselect them. They build real engines from a small exported
model, run them with TrtRunner and compare with ONNX Runtime: no mocks.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- static typing against NVIDIA's stubs

def _stub_dirs() -> tuple[Path, Path] | None:
    """tensorrt-stubs installs tensorrt/__init__.pyi and tensorrt_bindings/*.pyi into site-packages."""
    for base in map(Path, sys.path):
        t, b = base / "tensorrt" / "__init__.pyi", base / "tensorrt_bindings" / "tensorrt.pyi"
        if t.is_file() and b.is_file():
            return t.parent, b.parent
    return None


def test_tensorrt_module_type_checks_against_tensorrt_stubs(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'kdtoolkit[dev]')")
    dirs = _stub_dirs()
    if dirs is None:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    # The stubs ship without py.typed, so mypy reads them only through MYPYPATH; copy them out of
    # site-packages (mypy refuses site-packages on MYPYPATH) and repair two generator slips that are
    # Python syntax errors in tensorrt-stubs 10.13 (a parameter named `in`, a required parameter after
    # defaulted ones). Errors inside the stubs themselves are silenced; ours are not.
    stubs = tmp_path / "stubs"
    for d in dirs:
        shutil.copytree(d, stubs / d.name, ignore=shutil.ignore_patterns("*.py", "*.pyc", "__pycache__"))
    pyi = stubs / "tensorrt_bindings" / "tensorrt.pyi"
    text = re.sub(r"([(,] *)in: ", r"\1in_: ", pyi.read_text())
    text = re.sub(r"(=\s*[^,()]+,\s*channel_axis: int)\)", r"\1 = ...)", text)
    pyi.write_text(text)
    cfg = tmp_path / "mypy.ini"
    # only TensorRT's stubs are followed (other imports are Any): the point is TensorRT's API, and it keeps mypy fast
    cfg.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = skip\n"
                   "[mypy-tensorrt,tensorrt.*,tensorrt_bindings,tensorrt_bindings.*]\nfollow_imports = silent\nignore_errors = True\n")
    # the checker must really see the stubs: a deliberate misuse has to fail
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\ntrt.Builder(trt.Logger(trt.Logger.WARNING)).create_network('not an int')\n")
    cache = Path(os.environ.get("KDTOOLKIT_CACHE", Path.home() / ".cache" / "kdtoolkit")) / "mypy-trt"
    env = {**os.environ, "MYPYPATH": str(stubs)}
    base = [sys.executable, "-m", "mypy", "--config-file", str(cfg), "--cache-dir", str(cache)]
    bad = subprocess.run([*base, str(probe)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert bad.returncode == 1 and "create_network" in bad.stdout, bad.stdout + bad.stderr
    r = subprocess.run([*base, "kdtoolkit/backends/trt/"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- builder pieces that need no TensorRT

def test_resolve_config_from_profiles():
    from kdtoolkit.backends.trt.config import resolve_config
    from kdtoolkit.backends.trt.version import build_path
    from kdtoolkit.errors import InputError
    from kdtoolkit.targets import load_profile

    orin = resolve_config(load_profile("jetson-agx-orin"), has_qdq=False, trt_path=build_path("8.5.2"), device_key="Orin-sm87")
    assert (orin.precision, orin.batch_min, orin.batch_opt, orin.batch_max, orin.workspace_mb) == ("int8", 1, 1, 16, 2048)
    # issue 15.8: keyed by TensorRT version AND device (GPU name + compute capability), not by the version alone
    assert orin.timing_cache and orin.timing_cache.endswith(os.path.join("trt-8.5.2", "Orin-sm87", "timing.cache"))
    other = resolve_config(load_profile("jetson-agx-orin"), has_qdq=False, trt_path=build_path("8.5.2"), device_key="NVIDIA-A10-sm86")
    assert other.timing_cache != orin.timing_cache
    dla = resolve_config(load_profile("jetson-agx-orin-dla"), has_qdq=False)
    assert (dla.dla_core, dla.batch_min, dla.batch_max, dla.calib_batch_size) == (0, 1, 1, 1)
    gpu = load_profile("desktop-gpu")
    assert resolve_config(gpu, has_qdq=True).precision == "int8"  # auto + Q/DQ
    assert resolve_config(gpu, has_qdq=False).precision == "fp16"  # auto, nothing measured at build time
    assert resolve_config(gpu, has_qdq=False, precision="fp32").precision_reason == "from --precision"
    with pytest.raises(InputError, match="pick a tensorrt profile"):
        resolve_config(load_profile("ort-cpu"), has_qdq=False)


def test_profile_shapes_and_their_errors():
    from kdtoolkit.backends.trt.config import BuildConfig, _profile_shapes
    from kdtoolkit.errors import InputError

    cfg = BuildConfig(precision="fp16", batch_min=1, batch_opt=4, batch_max=8)
    assert _profile_shapes([-1, 3, 32, 32], cfg, "x") == ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))
    with pytest.raises(InputError, match="only the batch axis"):
        _profile_shapes([-1, 3, -1, -1], cfg, "x")
    with pytest.raises(InputError, match="fixed batch 1"):
        _profile_shapes([1, 3, 32, 32], cfg, "x")
    static = cfg.model_copy(update={"static_input_shape": [2, 3, 32, 32]})
    assert _profile_shapes([-1, 3, 32, 32], static, "x") == ((2, 3, 32, 32),) * 3
    with pytest.raises(InputError, match="does not fit the profile's static shape"):
        _profile_shapes([-1, 3, 16, 16], static, "x")


def test_fp16_conversion_for_strongly_typed_tensorrt_keeps_fp32_io(tmp_path):
    """TensorRT >= 11 gets FP16 by converting the ONNX: the converted model must still take and give fp32."""
    import onnx
    import torch

    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.backends.trt.builder import convert_onnx_fp16
    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.zoo import small_cnn

    torch.manual_seed(0)
    export_onnx(small_cnn(num_classes=10, in_channels=1, width=0.25).eval(), (1, 1, 28, 28), tmp_path / "fp32.onnx")
    tool = convert_onnx_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")
    assert "float16" in tool
    m = onnx.load(str(tmp_path / "fp16.onnx"))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    x = _inputs(8)
    ref = make_session(tmp_path / "fp32.onnx").run(None, {"input": x})[0]
    got = make_session(tmp_path / "fp16.onnx").run(None, {"input": x})[0]
    assert got.dtype == np.float32 and np.abs(got - ref).max() < 0.05


def test_calibration_arrays_from_a_dataset_or_a_npy(tmp_path):
    from kdtoolkit.backends.trt.calibrator import calibration_arrays
    from kdtoolkit.errors import InputError

    a = calibration_arrays("mnist-mini", (1, 28, 28), limit=32)  # training split, normalised like the model
    assert a.shape == (32, 1, 28, 28) and a.dtype == np.float32
    np.save(tmp_path / "c.npy", a)
    assert calibration_arrays(str(tmp_path / "c.npy"), (1, 28, 28), limit=8).shape == (8, 1, 28, 28)
    with pytest.raises(InputError, match="must be N,3,28,28, got"):
        calibration_arrays(str(tmp_path / "c.npy"), (3, 28, 28), limit=8)
    # a user's folder with an unreadable file: named, then left out with on_bad_image='skip' (compress --on-bad-image)
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (28, 28), 40 * i).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "a" / "9_broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="9_broken.png: cannot read image"):
        calibration_arrays(str(tmp_path / "imgs"), (1, 28, 28), limit=8)
    assert calibration_arrays(str(tmp_path / "imgs"), (1, 28, 28), limit=100, on_bad_image="skip").shape[1:] == (1, 28, 28)


# ---------------------------------------------------------------- real TensorRT (docker images)

@pytest.fixture(scope="module")
def trt_ready():
    from kdtoolkit.errors import KdtError

    try:
        from kdtoolkit.backends.trt import cuda_mem
        from kdtoolkit.backends.trt.lazy import load_tensorrt

        trt = load_tensorrt()
        cuda_mem.backend()
    except KdtError as exc:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {exc}")
    return trt


PROFILE_YAML = """
name: test-gpu
device: gpu
backend: tensorrt
precision: {precision}
batch: {{min: 1, opt: 4, max: 8}}
max_opset: 17
quant: {{scheme: tensorrt, calib_size: 64}}
tensorrt: {{min_version: "8.5", workspace_mb: 256, timing_cache: {cache}}}
"""


def _profile(tmp: Path, precision: str):
    from kdtoolkit.targets import parse_profile

    return parse_profile(PROFILE_YAML.format(precision=precision, cache=tmp / "timing.cache"), "test-gpu")


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Path:
    import torch

    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.zoo import small_cnn

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("onnx")
    export_onnx(small_cnn(num_classes=10, in_channels=1, width=0.25).eval(), (1, 1, 28, 28), d / "model.onnx")
    return d / "model.onnx"


def _inputs(n: int = 8) -> np.ndarray:
    from kdtoolkit.data import load_data
    from kdtoolkit.data.datasets import to_tensor

    sp = load_data("mnist-mini")
    return to_tensor(sp.test.x[:n], sp.spec).numpy().astype(np.float32)


def _ort(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    from kdtoolkit.backends.ort import make_session

    s = make_session(onnx_path)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.tensorrt
def test_fp32_engine_matches_onnxruntime(trt_ready, small_onnx, tmp_path):
    from kdtoolkit.artifact import Artifact
    from kdtoolkit.backends.trt.builder import build_engine
    from kdtoolkit.backends.trt.runner import TrtRunner

    art = build_engine(small_onnx, _profile(tmp_path, "fp32"), tmp_path / "eng")
    assert Artifact.load(art.path).verify() == []
    assert art.info["tensorrt"]["version"] == trt_ready.__version__
    assert art.info["optimization_profile"]["input"] == {"min": [1, 1, 28, 28], "opt": [4, 1, 28, 28], "max": [8, 1, 28, 28]}
    x = _inputs(8)
    ref = _ort(small_onnx, x)
    with TrtRunner(art.path) as r:
        for b in (1, 4, 8):
            got = r(x[:b])
            assert got.shape == ref[:b].shape
            np.testing.assert_allclose(got, ref[:b], rtol=1e-3, atol=1e-3)


@pytest.mark.tensorrt
def test_plan_is_raw_and_loads_with_plain_tensorrt(trt_ready, small_onnx, tmp_path):
    from kdtoolkit.backends.trt.builder import build_engine

    art = build_engine(small_onnx, _profile(tmp_path, "fp32"), tmp_path / "eng")
    runtime = trt_ready.Runtime(trt_ready.Logger(trt_ready.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((art.path / "model.plan").read_bytes())  # no header of ours in the way
    assert engine is not None and engine.num_io_tensors == 2


@pytest.mark.tensorrt
def test_batch_outside_the_profile_is_a_clear_input_error(trt_ready, small_onnx, tmp_path):
    from kdtoolkit.backends.trt.builder import build_engine
    from kdtoolkit.backends.trt.runner import TrtRunner
    from kdtoolkit.errors import InputError

    art = build_engine(small_onnx, _profile(tmp_path, "fp32"), tmp_path / "eng")
    with TrtRunner(art.path) as r:
        with pytest.raises(InputError, match=r"batch 9 is outside the engine's profile: expected 1..8"):
            r(np.zeros((9, 1, 28, 28), np.float32))


@pytest.mark.tensorrt
def test_timing_cache_is_written_and_reused(trt_ready, small_onnx, tmp_path):
    from kdtoolkit.backends.trt.builder import build_engine

    prof = _profile(tmp_path, "fp32")
    first = build_engine(small_onnx, prof, tmp_path / "a")
    assert (tmp_path / "timing.cache").stat().st_size > 0 and first.info["timing_cache"]["reused"] is False
    second = build_engine(small_onnx, prof, tmp_path / "b")
    assert second.info["timing_cache"]["reused"] is True and second.info["timing_cache"]["set"] is True
    assert second.info["timing_cache"]["device_key"] != "unknown-device"


@pytest.mark.tensorrt
def test_dla_builds_a_qdq_onnx_through_the_calibration_cache(trt_ready, small_onnx, tmp_path):
    """Issue 15.1 on the device: the DLA profile's Q/DQ ONNX builds (Q/DQ stripped, scales from the cache) below TensorRT 11."""
    from kdtoolkit.backends.trt.builder import build_engine
    from kdtoolkit.backends.trt.runner import TrtRunner
    from kdtoolkit.backends.trt.version import build_path
    from kdtoolkit.quant.ptq import quantize_onnx
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    dla = load_profile("jetson-agx-orin-dla")
    if not build_path(trt_ready.__version__).dla or trt_ready.Builder(trt_ready.Logger()).num_DLA_cores == 0:
        pytest.skip("no DLA here (needs a Jetson AGX Orin with TensorRT 8.5 .. 10.7 or 11.4.1+)")
    quantize_onnx(small_onnx, tmp_path / "qdq.onnx", _inputs(64), scheme_for(dla))
    art = build_engine(tmp_path / "qdq.onnx", dla, tmp_path / "eng")
    x = _inputs(1)
    with TrtRunner(art.path) as r:
        got = r(x)
    assert got.argmax(1)[0] == _ort(tmp_path / "qdq.onnx", x).argmax(1)[0]


@pytest.mark.tensorrt
def test_fp16_engine_agrees_with_onnxruntime(trt_ready, small_onnx, tmp_path):
    from kdtoolkit.backends.trt.builder import build_engine
    from kdtoolkit.backends.trt.runner import TrtRunner

    art = build_engine(small_onnx, _profile(tmp_path, "fp16"), tmp_path / "eng")
    x = _inputs(8)
    ref = _ort(small_onnx, x)
    with TrtRunner(art.path) as r:
        got = r(x)
    assert np.abs(got - ref).max() < 0.1
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.875
    if art.info["tensorrt"]["build_path"]["strongly_typed"]:
        assert "fp16_conversion" in art.info


@pytest.mark.tensorrt
def test_int8_with_entropy_calibrator_or_refusal(trt_ready, small_onnx, tmp_path):
    from kdtoolkit.backends.trt.builder import build_engine
    from kdtoolkit.backends.trt.runner import TrtRunner
    from kdtoolkit.errors import InputError

    calib = tmp_path / "calib.npy"
    np.save(calib, _inputs(64))
    prof = _profile(tmp_path, "int8")
    from kdtoolkit.backends.trt.version import build_path

    if build_path(trt_ready.__version__).strongly_typed:
        with pytest.raises(InputError, match="needs a Q/DQ ONNX"):
            build_engine(small_onnx, prof, tmp_path / "eng", calib_data=str(calib))
        return
    art = build_engine(small_onnx, prof, tmp_path / "eng", calib_data=str(calib))
    assert (art.path / "calibration.cache").stat().st_size > 0
    x = _inputs(8)
    with TrtRunner(art.path) as r:
        got = r(x)
    assert (got.argmax(1) == _ort(small_onnx, x).argmax(1)).mean() >= 0.75


@pytest.mark.tensorrt
def test_cli_build_writes_an_engine_artifact(trt_ready, small_onnx, tmp_path):
    from conftest import run_cli

    prof = tmp_path / "p.yaml"
    prof.write_text(PROFILE_YAML.format(precision="fp32", cache=tmp_path / "timing.cache"))
    r = run_cli("build", str(small_onnx), "--profile", str(prof), "--out", str(tmp_path / "eng"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "eng" / "model.plan").is_file() and (tmp_path / "eng" / "manifest.json").is_file()


# ---------------------------------------------------------------- timing cache and CUDA adapter, without TensorRT

class _FakeConfig:
    """Stands in for IBuilderConfig: set_timing_cache says False for a cache 'from another device'."""

    def __init__(self, accept_nonempty: bool) -> None:
        self.accept_nonempty, self.set_calls = accept_nonempty, []

    def create_timing_cache(self, data: bytes) -> bytes:
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        self.set_calls.append((cache, ignore_mismatch))
        return self.accept_nonempty or not cache


def test_timing_cache_reuse_is_reported_truthfully(tmp_path):
    """Issue 15.8: set_timing_cache's result decides `reused`; a rejected cache is replaced by an empty one and said so."""
    from kdtoolkit.backends.trt.builder import _use_timing_cache
    from kdtoolkit.backends.trt.config import gpu_cache_key

    f = tmp_path / "timing.cache"
    assert _use_timing_cache(_FakeConfig(True), f) == {"set": True, "reused": False}  # no file yet
    f.write_bytes(b"cache-from-somewhere")
    assert _use_timing_cache(_FakeConfig(True), f) == {"set": True, "reused": True}
    cfg = _FakeConfig(False)
    got = _use_timing_cache(cfg, f)
    assert got["reused"] is False and got["set"] is True and "not accepted by TensorRT" in got["note"]
    assert [c[1] for c in cfg.set_calls] == [False, False] and cfg.set_calls[1][0] == b""
    assert _use_timing_cache(_FakeConfig(True), None) == {"set": False, "reused": False}
    assert gpu_cache_key("NVIDIA A10", (8, 6)) == "NVIDIA-A10-sm86" and gpu_cache_key("Orin (nvgpu)", (8, 7)) == "Orin-nvgpu-sm87"


@pytest.mark.parametrize("binding,driver,ok", [("13.0.1", 12060, False), ("12.6.2", 12060, True), ("12.9.0", 13000, True),
                                               ("13.0.0", 13000, True), ("11.8.0", 12020, True)])
def test_cuda_python_major_must_fit_the_driver(binding, driver, ok):
    """Issue 15.9: cuda-python 13.x needs a CUDA 13 driver; a CUDA 12.6 image must pin cuda-python < 13."""
    from kdtoolkit.backends.trt.cuda_mem import binding_fits_driver

    problem = binding_fits_driver(binding, driver)
    assert (problem is None) is ok
    if not ok:
        assert "pip install 'cuda-python>=12.0,<13'" in problem


def test_pycuda_errors_become_one_line_kdtoolkit_errors(monkeypatch):
    """Issue 15.9: pycuda's own exceptions (cuInit failed ...) come out as CheckFailed, so callers (and the fixture) can react."""
    import types

    from kdtoolkit.backends.trt import cuda_mem
    from kdtoolkit.errors import CheckFailed

    pkg = types.ModuleType("pycuda")
    pkg.__path__ = []  # a package, so pycuda.autoprimaryctx is looked up through the finder below
    drv = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    Error.__module__ = "pycuda._driver"
    drv.Error = Error
    auto = types.ModuleType("pycuda.autoprimaryctx")

    def _boom(*a, **k):
        raise Error("cuInit failed: no CUDA-capable device is detected")

    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setattr(pkg, "driver", drv, raising=False)
    # importing pycuda.autoprimaryctx runs cuInit: simulate its failure through a meta path finder
    import importlib.abc

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "pycuda.autoprimaryctx":
                _boom()
            return None

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    monkeypatch.setattr(cuda_mem, "_active", None)
    monkeypatch.setenv("KDTOOLKIT_CUDA_BACKEND", "pycuda")
    with pytest.raises(CheckFailed, match="pycuda is installed but CUDA does not initialise .*cuInit failed"):
        cuda_mem.backend()

    # an operation failing inside pycuda: wrapped too
    b = object.__new__(cuda_mem._PyCuda)
    b.cuda = types.SimpleNamespace(mem_alloc=_boom)
    with pytest.raises(CheckFailed, match="CUDA memory allocation through pycuda failed"):
        b.alloc(16)
    del auto
