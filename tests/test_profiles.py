import pytest

from kdtoolkit.errors import InputError
from kdtoolkit.profiles import builtin_names, load_profile, parse_profile


def test_builtin_profiles_are_valid_and_real():
    names = builtin_names()
    for required in ("ort-cpu", "jetson-agx-orin", "jetson-orin-nano", "desktop-gpu"):
        assert required in names
    orin = load_profile("jetson-agx-orin")
    assert orin.backend == "tensorrt" and orin.quant.scheme == "tensorrt" and orin.max_opset == 17
    assert orin.channel_multiple == 8 and orin.tensorrt is not None
    cpu = load_profile("ort-cpu")
    assert cpu.backend == "onnxruntime" and cpu.quant.scheme == "ort_x86"
    assert load_profile("jetson-agx-orin-dla").tensorrt.dla_core == 0


def test_unknown_key_names_key_and_line(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nbackend: onnxruntime\nonnxruntime:\n  intra_op_threads: 2\n  thread: 3\n")
    with pytest.raises(InputError, match=r"unknown key 'onnxruntime.thread' \(line 5\)"):
        load_profile(str(p))


def test_wrong_type_and_inconsistent_values():
    with pytest.raises(InputError, match=r"max_opset \(line 3\)"):
        parse_profile("name: x\nbackend: onnxruntime\nmax_opset: seventeen\n", "x.yaml")
    with pytest.raises(InputError, match="min <= opt <= max"):
        parse_profile("name: x\nbackend: onnxruntime\nbatch: {min: 8, opt: 1, max: 4}\n", "x.yaml")
    with pytest.raises(InputError, match="DLA"):
        parse_profile("name: x\nbackend: tensorrt\ndevice: gpu\ntensorrt: {dla_core: 0}\n", "x.yaml")


def test_unknown_profile_lists_known_ones():
    with pytest.raises(InputError, match="known: .*ort-cpu"):
        load_profile("jetson-xavier-nx")
    with pytest.raises(InputError, match="not found"):
        load_profile("missing/profile.yaml")


def test_overrides_apply():
    p = load_profile("ort-cpu", {"batch.max": 32, "quant.calib_size": 64})
    assert p.batch.max == 32 and p.quant.calib_size == 64
