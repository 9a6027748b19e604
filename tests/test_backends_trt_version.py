"""The TensorRT build path is a pure function of the version string: every version family, tested alone."""

from __future__ import annotations

import pytest

from kdtoolkit.backends.trt.version import build_path, dla_plan, parse_version, trt_version_number
from kdtoolkit.errors import InputError


@pytest.mark.parametrize(
    "text,expected",
    [("8.5.2", (8, 5, 2)), ("8.5.2.2", (8, 5, 2)), ("8.6.1", (8, 6, 1)), ("10.3.0", (10, 3, 0)), ("10.13", (10, 13, 0)),
     ("10", (10, 0, 0)), ("11.0.0.post1", (11, 0, 0)), (" 10.3.0.30 ", (10, 3, 0)), ("v8.6.2", (8, 6, 2)), ("11.4.1rc2", (11, 4, 1))],
)
def test_parse_version(text, expected):
    assert parse_version(text) == expected


@pytest.mark.parametrize("bad", ["", "ten", "x.1", "8..5", "None"])
def test_parse_version_rejects_garbage(bad):
    with pytest.raises(InputError, match="MAJOR.MINOR"):
        parse_version(bad)


@pytest.mark.parametrize("old", ["7.1.3", "8.0.1", "8.2.5", "8.4.3"])
def test_older_than_8_5_is_refused(old):
    with pytest.raises(InputError, match="expected 8.5 or newer"):
        build_path(old)


# JetPack 5.x -> 8.5, JetPack 6.0 -> 8.6, JetPack 6.1/6.2 -> 10.3, JetPack 7.x -> 10.13+, desktop 10.x
@pytest.mark.parametrize("v", ["8.5.2", "8.5.3.1", "8.6.1", "8.6.2", "9.3.0", "10.0.1", "10.1.0", "10.3.0", "10.7.0", "10.13", "10.14.1"])
def test_builder_flag_path(v):
    p = build_path(v)
    assert not p.strongly_typed
    assert p.precision_flags and p.int8_calibrator
    assert p.fp16_route == "builder_flag" and p.int8_route == "calibrator_or_qdq"
    assert p.named_tensors and p.memory_pool_limit
    assert p.known


@pytest.mark.parametrize("v", ["11.0.0", "11.1", "11.3.1", "11.4.1", "11.9"])
def test_strongly_typed_path(v):
    p = build_path(v)
    assert p.strongly_typed
    assert not p.precision_flags and not p.int8_calibrator and not p.precision_flags_deprecated
    assert p.fp16_route == "convert_onnx" and p.int8_route == "qdq_only"
    assert not p.explicit_batch_flag
    assert "strongly typed" in p.describe()


def test_future_major_follows_strongly_typed_and_is_flagged_unknown():
    p = build_path("12.0")
    assert p.strongly_typed and not p.known


@pytest.mark.parametrize("v,flag", [("8.5.2", True), ("8.6.1", True), ("9.3", True), ("10.0.0", False), ("10.3", False), ("11.0", False)])
def test_explicit_batch_flag_only_below_10(v, flag):
    assert build_path(v).explicit_batch_flag is flag


# NvInfer.h: BuilderFlag::kFP16/kINT8 are TRT_DEPRECATED from 10.12; the IInt8*Calibrator classes from 10.1
@pytest.mark.parametrize("v,dep", [("8.6.1", False), ("10.0.1", False), ("10.1.0", False), ("10.11.0", False),
                                   ("10.12.0", True), ("10.13", True), ("11.0", False)])
def test_precision_flags_deprecated_from_10_12(v, dep):
    assert build_path(v).precision_flags_deprecated is dep


@pytest.mark.parametrize("v,dep", [("8.6.1", False), ("10.0.1", False), ("10.1.0", True), ("10.3", True), ("11.0", False)])
def test_calibrator_deprecated_from_10_1(v, dep):
    assert build_path(v).calibrator_deprecated is dep


def test_describe_names_each_deprecation_with_its_version():
    assert "deprecated" not in build_path("10.0.1").describe()
    assert "calibrator since 10.1" in build_path("10.3").describe() and "10.12" not in build_path("10.3").describe()
    assert "builder flags since 10.12" in build_path("10.13").describe()


@pytest.mark.parametrize("v,lvl", [("8.5.2", False), ("8.6.0", True), ("10.3", True), ("11.0", True)])
def test_builder_optimization_level_from_8_6(v, lvl):
    assert build_path(v).builder_optimization_level is lvl


@pytest.mark.parametrize(
    "v,dla",
    [("8.5.2", True), ("8.6.2", True), ("10.3.0", True), ("10.7.0", True), ("10.8.0", False), ("10.13", False),
     ("11.0", False), ("11.3.1", False), ("11.4.0", False), ("11.4.1", True), ("11.5", True), ("12.0", False)],
)
def test_dla_availability(v, dla):
    assert build_path(v).dla is dla


def test_tuple_input_equals_string():
    assert build_path((10, 3)) == build_path("10.3.0")


def test_dla_plan_flag_path_uses_calibrator():
    assert dla_plan(build_path("8.5.2"), precision="int8", has_qdq=False)["int8"] == "calibrator"
    assert dla_plan(build_path("8.5.2"), precision="int8", has_qdq=False, calib_cache=True)["int8"] == "calibration_cache"
    assert dla_plan(build_path("10.3"), precision="fp16", has_qdq=False) == {"int8": None, "fp16": True, "strip_qdq": False}
    with pytest.raises(InputError, match="got a Q/DQ ONNX and no cache"):
        dla_plan(build_path("8.6.1"), precision="int8", has_qdq=True)


@pytest.mark.parametrize("v", ["8.5.2", "8.6.2", "10.3.0", "10.7.0"])
def test_dla_plan_qdq_below_11_builds_from_a_calibration_cache(v):
    plan = dla_plan(build_path(v), precision="int8", has_qdq=True, calib_cache=True)
    assert plan == {"int8": "calibration_cache_from_qdq", "fp16": True, "strip_qdq": True}


def test_dla_on_11_4_0_is_refused_with_the_jetson_release_named():
    with pytest.raises(InputError, match=r"11\.4\.1\+"):
        dla_plan(build_path("11.4.0"), precision="int8", has_qdq=True)


@pytest.mark.parametrize("v,n", [("8.5.2", 8502), ("8.6.1", 8601), ("10.3.0", 100300), ("10.13.2", 101302), ((8, 5), 8500)])
def test_trt_version_number_as_in_calibration_cache_headers(v, n):
    assert trt_version_number(v) == n


def test_dla_plan_strongly_typed_needs_qdq():
    assert dla_plan(build_path("11.4.1"), precision="int8", has_qdq=True)["int8"] == "qdq"
    with pytest.raises(InputError, match="needs a Q/DQ ONNX"):
        dla_plan(build_path("11.4.1"), precision="int8", has_qdq=False)


def test_dla_plan_refuses_fp32_and_unsupported_versions():
    with pytest.raises(InputError, match="FP16 or INT8 only"):
        dla_plan(build_path("8.6.1"), precision="fp32", has_qdq=False)
    with pytest.raises(InputError, match="DLA builds need"):
        dla_plan(build_path("11.1"), precision="int8", has_qdq=True)


def test_as_dict_is_json_ready():
    import json

    d = build_path("10.3.0").as_dict()
    assert d["version"] == "10.3.0"
    json.dumps(d)
