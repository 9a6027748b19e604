"""deploy/build_on_device.sh with a stand-in trtexec/kdtoolkit that record their arguments: the lines a device would run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE = """#!/usr/bin/env bash
echo "$@" >> "{log}"
if [ "${{1:-}}" = --help ]; then echo "--skipInference --builderOptimizationLevel"; exit 0; fi
for a in "$@"; do case "$a" in --saveEngine=*) mkdir -p "$(dirname "${{a#--saveEngine=}}")"; echo plan > "${{a#--saveEngine=}}";; esac; done
if [ "$(basename "$0")" = kdtoolkit ]; then mkdir -p engine && echo plan > engine/model.plan; fi
"""


def _bundle(tmp_path: Path, *, precision: str, qdq: bool, cache: bool = False, dla=None, commands=None) -> Path:
    b = tmp_path / "bundle"
    (b / "model").mkdir(parents=True)
    files = {"model/model.onnx": {"sha256": "x"}}
    if cache:
        (b / "model" / "calibration.cache").write_text("TRT-8500-EntropyCalibration2\nx: 3d4ccccd\n")
        files["model/calibration.cache"] = {"sha256": "y"}
    m = {"profile": {"name": "p", "precision": precision, "batch": {"min": 1, "opt": 2, "max": 4}, "static_input_shape": None,
                     "tensorrt": {"dla_core": dla, "gpu_fallback": True, "workspace_mb": 2048, "timing_cache": "timing.cache",
                                  "builder_optimization_level": 3}},
         "runtime": {"onnx": "model/model.onnx"}, "model": {"qdq": qdq}, "inputs": [{"name": "input", "shape": ["batch", 3, 8, 8]}],
         "files": files, "on_device": {"commands": commands or {}}}
    (b / "manifest.json").write_text(json.dumps(m))
    return b


def _run(tmp_path: Path, bundle: Path, *, use_kdtoolkit=False, env_extra=None) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    for name in ("trtexec",) + (("kdtoolkit",) if use_kdtoolkit else ()):
        f = bin_dir / name
        f.write_text(FAKE.format(log=log))
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), **(env_extra or {})}
    r = subprocess.run(["bash", str(REPO / "deploy" / "build_on_device.sh"), str(bundle)], capture_output=True, text=True, env=env,
                       timeout=60)
    return r, (log.read_text().splitlines() if log.exists() else [])


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("python3") is None, reason="needs bash and python3")
class TestBuildOnDevice:
    def test_auto_without_qdq_builds_fp16_not_placeholder_int8(self, tmp_path):
        r, calls = _run(tmp_path, _bundle(tmp_path, precision="auto", qdq=False))
        assert r.returncode == 0, r.stderr
        build = next(c for c in calls if c.startswith("--onnx="))
        assert "--fp16" in build and "--int8" not in build and "--calib" not in build
        assert "--memPoolSize=workspace:2048" in build.split() and "--skipInference" in build

    def test_int8_on_a_gpu_also_sets_fp16_like_kdtoolkit_build(self, tmp_path):
        r, calls = _run(tmp_path, _bundle(tmp_path, precision="int8", qdq=True))
        build = next(c for c in calls if c.startswith("--onnx="))
        assert r.returncode == 0 and "--fp16" in build and "--int8" in build and "--calib" not in build

    def test_int8_without_qdq_uses_the_shipped_cache_or_says_fp16(self, tmp_path):
        r, calls = _run(tmp_path, _bundle(tmp_path, precision="int8", qdq=False, cache=True))
        build = next(c for c in calls if c.startswith("--onnx="))
        assert r.returncode == 0 and "--int8" in build and "--calib=model/calibration.cache" in build
        shutil.rmtree(tmp_path / "bundle")
        (tmp_path / "calls.log").unlink()
        r, calls = _run(tmp_path, _bundle(tmp_path, precision="int8", qdq=False))
        build = next(c for c in calls if c.startswith("--onnx="))
        assert r.returncode == 0 and "--int8" not in build and "--calib" not in build
        assert "trtexec cannot calibrate from data" in r.stderr

    def test_a_listed_cache_that_is_missing_stops_the_build(self, tmp_path):
        b = _bundle(tmp_path, precision="int8", qdq=False, cache=True)
        (b / "model" / "calibration.cache").unlink()
        r, calls = _run(tmp_path, b)
        assert r.returncode != 0 and "would calibrate on random data" in r.stderr
        assert not [c for c in calls if c.startswith("--onnx=")]

    def test_kdtoolkit_build_gets_the_calibration_cache(self, tmp_path):
        r, calls = _run(tmp_path, _bundle(tmp_path, precision="int8", qdq=False, cache=True), use_kdtoolkit=True)
        assert r.returncode == 0, r.stderr
        assert "build model/model.onnx --profile p --out engine --calib-cache model/calibration.cache" in calls

    def test_the_manifests_own_commands_win(self, tmp_path):
        cmds = {"kdtoolkit_build": "kdtoolkit build model/model.onnx --profile p --out engine --calib-cache model/calibration.cache",
                "trtexec_build": "trtexec --onnx=model/model_noqdq.onnx --saveEngine=model/model.plan --fp16 --int8 "
                                 "--calib=model/calibration.cache --useDLACore=0"}
        r, calls = _run(tmp_path, _bundle(tmp_path, precision="int8", qdq=True, cache=True, dla=0, commands=cmds))
        assert r.returncode == 0, r.stderr
        assert any(c.startswith("--onnx=model/model_noqdq.onnx --saveEngine=model/model.plan --fp16 --int8") for c in calls)


def test_bundle_build_script_checks_the_cache_before_building(tmp_path):
    """The bundle's own build_on_device.sh refuses to run trtexec --calib on a missing cache."""
    from kdtoolkit.bundle import _build_script
    from kdtoolkit.targets import load_profile

    cmds = {"kdtoolkit_build": "kdtoolkit build model/model.onnx --profile p --out engine --calib-cache model/calibration.cache",
            "trtexec_build": "trtexec --onnx=model/model_noqdq.onnx --saveEngine=model/model.plan --calib=model/calibration.cache",
            "trtexec_profile": "trtexec --loadEngine=model/model.plan", "implicit_int8": "True",
            "calibration_cache": "model/calibration.cache", "note": ""}
    script = _build_script(load_profile("jetson-agx-orin-dla"), cmds)
    (tmp_path / "build_on_device.sh").write_text(script)
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": "/bin/true", "USE_TRTEXEC": "1"}
    r = subprocess.run(["bash", str(tmp_path / "build_on_device.sh")], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and "model/calibration.cache is missing" in r.stderr
    assert os.listdir(tmp_path) == ["build_on_device.sh"]
