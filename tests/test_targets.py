import pytest

from kdtoolkit.errors import InputError
from kdtoolkit.targets import ALIASES, UNSUPPORTED, builtin_names, load_profile, parse_profile, resolve_profile_name


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
        load_profile("raspberry-pi")
    with pytest.raises(InputError, match="not found"):
        load_profile("missing/profile.yaml")


def test_overrides_apply():
    p = load_profile("ort-cpu", {"batch.max": 32, "quant.calib_size": 64})
    assert p.batch.max == 32 and p.quant.calib_size == 64


@pytest.mark.parametrize(("typed", "canonical"), [
    ("jetson-agx", "jetson-agx-orin"),  # the mission's own spelling means AGX Orin
    ("agx-orin", "jetson-agx-orin"),
    ("orin-nano", "jetson-orin-nano"),
    ("jetson-nano-orin", "jetson-orin-nano"),
    ("orin-nx", "jetson-orin-nx"),
    ("orin-dla", "jetson-agx-orin-dla"),
    ("jetson-xavier", "jetson-agx-xavier"),
    ("agx-xavier", "jetson-agx-xavier"),
    ("xavier-nx", "jetson-xavier-nx"),
    ("cpu", "ort-cpu"),
    ("gpu", "desktop-gpu"),
    ("Jetson_AGX", "jetson-agx-orin"),  # case, underscores, spaces and an NVIDIA prefix do not matter
    ("NVIDIA Jetson AGX Orin", "jetson-agx-orin"),
])
def test_aliases_resolve_and_load(typed, canonical):
    assert resolve_profile_name(typed) == (canonical, typed)
    p = load_profile(typed)
    assert p.name == canonical and p.requested_as == typed
    # the alias never reaches a dump (manifests, cache keys): an alias and its profile are one target
    assert p.model_dump() == load_profile(canonical).model_dump()


def test_canonical_names_resolve_to_themselves():
    for name in builtin_names():
        assert resolve_profile_name(name) == (name, None)
        assert load_profile(name).requested_as is None


def test_every_alias_points_at_a_shipped_profile_and_none_shadows_one():
    names = set(builtin_names())
    assert set(ALIASES.values()) <= names
    assert not set(ALIASES) & names
    assert not set(ALIASES) & set(UNSUPPORTED)


def test_alias_with_overrides_and_user_file_are_unchanged(tmp_path):
    p = load_profile("cpu", {"batch.max": 32})
    assert p.name == "ort-cpu" and p.batch.max == 32
    f = tmp_path / "jetson-agx.yaml"  # a file is a file, even when its stem is an alias
    f.write_text("name: mine\nbackend: onnxruntime\n")
    mine = load_profile(str(f))
    assert mine.name == "mine" and mine.requested_as is None


def test_agx_xavier_profile_is_jetpack5_tensorrt85():
    x = load_profile("jetson-agx-xavier")
    assert x.device == "jetson" and x.backend == "tensorrt" and x.quant.scheme == "tensorrt"
    assert x.tensorrt is not None and x.tensorrt.min_version == "8.5"
    assert x.max_opset == 17  # TensorRT 8.5's parser: the only TensorRT Xavier gets (JetPack 5.1)
    assert x.precision == "int8" and x.channel_multiple == 8  # sm_72 tensor cores run INT8
    assert "Xavier" in x.description


@pytest.mark.parametrize("typed", ["jetson-nano", "Jetson Nano", "jetson-tx2", "tx2", "tx1", "nano"])
def test_devices_below_the_tensorrt_floor_are_refused_with_the_reason(typed):
    with pytest.raises(InputError) as info:
        load_profile(typed)
    msg = str(info.value)
    assert "\n" not in msg and "not supported" in msg
    assert "TensorRT 8.2" in msg and "8.5" in msg


def test_original_nano_refusal_points_at_the_orin_nano():
    with pytest.raises(InputError, match="use jetson-orin-nano"):
        resolve_profile_name("jetson-nano")


@pytest.mark.parametrize(("typo", "suggestion"), [
    ("jetson-agx-orn", "jetson-agx-orin"),
    ("jetsn-xavier", "jetson-agx-xavier"),
    ("orin-nan", "jetson-orin-nano"),
    ("cpuu", "ort-cpu"),
    ("desktop-gpus", "desktop-gpu"),
])
def test_unknown_name_gets_did_you_mean(typo, suggestion):
    with pytest.raises(InputError, match=rf"unknown profile '{typo}'; did you mean {suggestion}\?"):
        resolve_profile_name(typo)


def test_ambiguous_name_lists_the_choices():
    with pytest.raises(InputError, match="fits several devices; pick one: jetson-agx-orin, jetson-orin-nx, jetson-orin-nano"):
        resolve_profile_name("orin")
    with pytest.raises(InputError, match="jetson-agx-xavier, jetson-xavier-nx"):
        load_profile("xavier")


def test_profiles_list_shows_aliases_and_show_takes_one():
    from conftest import run_cli

    out = run_cli("profiles", "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    orin = next(i for i, line in enumerate(lines) if line.startswith("jetson-agx-orin "))
    assert "jetson-agx" in lines[orin + 1].split("aliases:")[1].strip().split(", ")
    assert any(line.startswith("jetson-agx-xavier ") for line in lines)
    assert "not supported: the original Jetson Nano" in out.stdout
    shown = run_cli("profiles", "show", "jetson-agx", "--as-json")
    assert shown.returncode == 0, shown.stderr
    assert '"name": "jetson-agx-orin"' in shown.stdout and "jetson-agx -> jetson-agx-orin" in shown.stderr
    bad = run_cli("profiles", "show", "jetson-nano")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert "TensorRT 8.2" in bad.stderr
