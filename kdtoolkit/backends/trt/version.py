"""Which TensorRT build path a version takes: a pure function of the version string, tested alone.

TensorRT changed under our feet, so the builder never guesses from ``hasattr``: it asks
:func:`build_path` once and follows the answer.

- 8.5 .. 10.x: builder flags (FP16/INT8; deprecated in 10.12, still present until 11), implicit INT8
  from an ``IInt8EntropyCalibrator2`` (the calibrator classes were deprecated in 10.1, still present
  until 11), explicit-batch network flag needed below 10 (10.0 made every network explicit batch and
  ignores the flag).
- >= 11: networks are always strongly typed. No FP16/INT8 builder flags and no calibrator: INT8
  comes only from explicit Q/DQ in the ONNX, FP16 from converting the ONNX to FP16 first.
- Named-tensor API (``set_tensor_address`` + ``execute_async_v3``) exists from 8.5, which is the
  oldest version kdtoolkit supports (JetPack 5.x); ``set_memory_pool_limit`` from 8.4.
- DLA: available 8.5 .. 10.7 (TensorRT's "Working with DLA" page, 11.4.1: "TensorRT 10.7 was the
  last 10.x release that supported DLA"; JetPack 6.x ships 10.3), absent in 11.0 .. 11.3; 11.4.0
  brings it back on Windows on ARM only, Jetson AGX Orin gets it in 11.4.1 (JetPack 7.2.2), strongly
  typed. Nothing is known about majors after 11, so they get no DLA until a source says otherwise.
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-with-dla.html
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from kdtoolkit.errors import InputError

OLDEST = (8, 5)
_VERSION_RE = re.compile(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?(?:[.+\-]?[A-Za-z][\w.+\-]*)?\s*$")


def parse_version(text: str) -> tuple[int, int, int]:
    """'8.5.2.2' -> (8, 5, 2); '10.13' -> (10, 13, 0); anything else is an InputError."""
    m = _VERSION_RE.match(str(text))
    if not m:
        raise InputError(f"TensorRT version must look like MAJOR.MINOR[.PATCH], got {text!r}")
    major, minor, patch = (int(g) if g is not None else 0 for g in m.groups()[:3])
    return major, minor, patch


@dataclass(frozen=True)
class BuildPath:
    """What the installed TensorRT offers, and so how the builder and runner must talk to it."""

    version: tuple[int, int, int]
    strongly_typed: bool  # networks are always strongly typed (>= 11): no precision flags at all
    precision_flags: bool  # BuilderFlag.FP16 / BuilderFlag.INT8 exist (< 11)
    precision_flags_deprecated: bool  # BuilderFlag.FP16/INT8 deprecated from 10.12 (still work until 11)
    int8_calibrator: bool  # IInt8EntropyCalibrator2 + config.int8_calibrator (< 11)
    calibrator_deprecated: bool  # the calibrator classes are deprecated from 10.1 (still work until 11)
    explicit_batch_flag: bool  # pass NetworkDefinitionCreationFlag.EXPLICIT_BATCH (< 10)
    named_tensors: bool  # set_tensor_address / set_input_shape / execute_async_v3 (>= 8.5)
    memory_pool_limit: bool  # config.set_memory_pool_limit(WORKSPACE, bytes) (>= 8.4)
    builder_optimization_level: bool  # config.builder_optimization_level (>= 8.6)
    dla: bool  # DLA can be targeted with this version (see module docstring)
    fp16_route: Literal["builder_flag", "convert_onnx"]
    int8_route: Literal["calibrator_or_qdq", "qdq_only"]
    known: bool  # False for majors newer than this code was written against (treated like 11)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = ".".join(str(v) for v in self.version)
        return d

    def describe(self) -> str:
        v = ".".join(str(x) for x in self.version)
        if self.strongly_typed:
            return f"TensorRT {v}: strongly typed (INT8 only from Q/DQ in the ONNX, FP16 by converting the ONNX)"
        dep = [what for what, flag in (("calibrator since 10.1", self.calibrator_deprecated),
                                       ("builder flags since 10.12", self.precision_flags_deprecated)) if flag]
        extra = f" (deprecated: {', '.join(dep)})" if dep else ""
        return f"TensorRT {v}: builder flags FP16/INT8 and IInt8EntropyCalibrator2{extra}"


def build_path(version: str | tuple[int, ...]) -> BuildPath:
    """Map a TensorRT version to the build path; versions older than 8.5 are refused."""
    v = parse_version(version) if isinstance(version, str) else tuple(version) + (0,) * (3 - len(version))
    major, minor, patch = int(v[0]), int(v[1]), int(v[2])
    if (major, minor) < OLDEST:
        raise InputError(
            f"TensorRT {major}.{minor}.{patch} is older than kdtoolkit supports: expected 8.5 or newer (JetPack 5.x ships 8.5)"
        )
    typed = major >= 11
    if major < 10 or (major == 10 and minor <= 7):
        dla = True
    elif major == 11:
        dla = (minor, patch) >= (4, 1)  # 11.4.0: Windows on ARM only; Jetson AGX Orin from 11.4.1 (JetPack 7.2.2)
    else:
        dla = False  # no source for DLA on majors after 11
    return BuildPath(
        version=(major, minor, patch),
        strongly_typed=typed,
        precision_flags=not typed,
        precision_flags_deprecated=(major, minor) >= (10, 12) and not typed,
        int8_calibrator=not typed,
        calibrator_deprecated=(major, minor) >= (10, 1) and not typed,
        explicit_batch_flag=major < 10,
        named_tensors=True,
        memory_pool_limit=True,
        builder_optimization_level=(major, minor) >= (8, 6),
        dla=dla,
        fp16_route="convert_onnx" if typed else "builder_flag",
        int8_route="qdq_only" if typed else "calibrator_or_qdq",
        known=major <= 11,
    )


def dla_plan(path: BuildPath, *, precision: str, has_qdq: bool, calib_cache: bool = False) -> dict[str, Any]:
    """How INT8/FP16 reaches the DLA on this version; raises InputError where it cannot.

    DLA runs FP16 or INT8 only. Before 11 it wants implicit INT8: a Q/DQ ONNX goes in with its Q/DQ
    nodes stripped and its scales as a calibration cache (what NVIDIA's qdq-translator does), so a
    Q/DQ ONNX builds only when such a cache is at hand (``calib_cache``). From 11.4.1 DLA is strongly
    typed, so INT8 must come from Q/DQ in the ONNX.
    """
    if not path.dla:
        v = ".".join(str(x) for x in path.version)
        raise InputError(f"DLA builds need TensorRT 8.5 to 10.7 or 11.4.1+ (Jetson AGX Orin, JetPack 7.2.2), got TensorRT {v}")
    if precision == "fp32":
        raise InputError("DLA runs FP16 or INT8 only, got precision fp32; use int8 or fp16 (or set tensorrt.dla_core: null)")
    if precision == "int8":
        if path.strongly_typed:
            if not has_qdq:
                raise InputError("INT8 on DLA with TensorRT >= 11 needs a Q/DQ ONNX (strongly typed), got an ONNX without Q/DQ nodes")
            return {"int8": "qdq", "fp16": False, "strip_qdq": False}
        if has_qdq:
            if not calib_cache:
                raise InputError(
                    "INT8 on DLA with TensorRT < 11 is implicit (calibration cache): a Q/DQ ONNX builds only with its scales as a "
                    "calibration cache (kdtoolkit writes calibration.cache beside the ONNX for DLA profiles; pass it with "
                    "--calib-cache), or build from the FP32 ONNX with --calib-data; got a Q/DQ ONNX and no cache"
                )
            return {"int8": "calibration_cache_from_qdq", "fp16": True, "strip_qdq": True}
        return {"int8": "calibration_cache" if calib_cache else "calibrator", "fp16": True, "strip_qdq": False}
    return {"int8": None, "fp16": True, "strip_qdq": False}


def trt_version_number(version: str | tuple[int, ...]) -> int:
    """NV_TENSORRT_VERSION as TensorRT writes it into calibration-cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    v = parse_version(version) if isinstance(version, str) else tuple(version) + (0,) * (3 - len(version))
    major, minor, patch = int(v[0]), int(v[1]), int(v[2])
    if major < 10:
        return major * 1000 + minor * 100 + patch
    return major * 10000 + minor * 100 + patch
