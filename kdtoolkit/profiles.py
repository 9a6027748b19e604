"""Target profiles: what a device's runtime wants (backend, precision, batches, opset, quant scheme).

Profiles are YAML files validated by pydantic with ``extra="forbid"``; an unknown or wrong key is
reported with its dotted name and the line it is on. Built-in profiles ship in
``kdtoolkit/builtin_profiles``; ``--profile`` also takes a path to a user's YAML file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdtoolkit.errors import InputError

BUILTIN_DIR = Path(__file__).parent / "builtin_profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BatchRange(_Strict):
    min: int = Field(1, ge=1, description="smallest batch the artifact must accept")
    opt: int = Field(1, ge=1, description="batch the decisions are optimised and measured for")
    max: int = Field(64, ge=1, description="largest batch the artifact must accept")

    @model_validator(mode="after")
    def _ordered(self) -> BatchRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch must satisfy min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        return self


class QuantSettings(_Strict):
    scheme: Literal["tensorrt", "ort_x86", "ort_arm"] = Field(
        "ort_x86", description="Q/DQ layout the backend runs fastest: TensorRT symmetric s8, ORT u8/s8 on x86, s8/s8 on ARM"
    )
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights against u8s8 saturation on x86 without VNNI; auto reads the local CPU"
    )
    method: Literal["qat", "ptq"] = Field("qat", description="default INT8 path: QAT under distillation, or PTQ")
    calib_method: Literal["minmax", "entropy", "percentile", "mse"] = Field("minmax", description="PTQ calibration")
    calib_size: int = Field(512, ge=1, description="calibration samples, drawn from the training split")
    percentile: float = Field(99.99, gt=50, le=100, description="for calib_method=percentile")


class TensorRTSettings(_Strict):
    min_version: str = Field("8.5", description="oldest TensorRT the target runs (JetPack 5 = 8.5)")
    workspace_mb: int = Field(1024, ge=16, description="builder workspace limit")
    dla_core: int | None = Field(None, ge=0, description="DLA core to build for, or none for the GPU")
    gpu_fallback: bool = Field(True, description="let layers DLA cannot run fall back to the GPU")
    timing_cache: str | None = Field("timing.cache", description="timing cache file reused across builds")
    builder_optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimisation level")


class OrtSettings(_Strict):
    intra_op_threads: int = Field(0, ge=0, description="0 = all physical cores")
    inter_op_threads: int = Field(1, ge=1, description="parallel independent ops")
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], description="in priority order")
    graph_optimization_level: Literal["basic", "extended", "all"] = Field("all", description="offline ORT optimisation")


class Profile(_Strict):
    name: str = Field(description="profile name")
    description: str = Field("", description="what device this is for")
    device: str = Field("cpu", description="device family: cpu, jetson, gpu")
    backend: Literal["onnxruntime", "tensorrt"] = Field(description="runtime that serves the model")
    precision: Literal["int8", "fp16", "fp32", "auto"] = Field("auto", description="auto = measure and pick")
    batch: BatchRange = Field(default_factory=BatchRange, description="batch range the artifact must accept")
    static_input_shape: list[int] | None = Field(None, description="pin N,C,H,W where the target needs a static shape (DLA)")
    max_opset: int = Field(17, ge=7, description="highest ONNX opset the target runtime accepts")
    channel_multiple: int = Field(1, ge=1, description="round student channel counts to this (8 for TensorRT INT8)")
    latency_budget_ms: float | None = Field(None, gt=0, description="target latency at batch.opt")
    accuracy_tolerance: float = Field(1.0, ge=0, description="allowed top-1 drop vs teacher, percentage points")
    quant: QuantSettings = Field(default_factory=QuantSettings)
    tensorrt: TensorRTSettings | None = Field(None, description="TensorRT build options")
    onnxruntime: OrtSettings = Field(default_factory=OrtSettings, description="ORT session options")
    power_mode: str | None = Field(None, description="Jetson nvpmodel mode the figures assume")

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.backend == "tensorrt" and self.tensorrt is None:
            self.tensorrt = TensorRTSettings()
        if self.tensorrt is not None and self.tensorrt.dla_core is not None and self.device != "jetson":
            raise ValueError(f"DLA (tensorrt.dla_core) exists only on Jetson devices, but device is {self.device!r}")
        if self.static_input_shape is not None and len(self.static_input_shape) != 4:
            raise ValueError("static_input_shape must be [N, C, H, W]")
        return self

    @property
    def is_tensorrt(self) -> bool:
        return self.backend == "tensorrt"

    def resolved_reduce_range(self) -> bool:
        if self.quant.reduce_range != "auto":
            return bool(self.quant.reduce_range)
        if self.quant.scheme != "ort_x86":
            return False
        from kdtoolkit.envinfo import cpu_info

        return not cpu_info()["vnni"]


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML document to its 1-based line number."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = (*path, str(k.value))
                index[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                index[(*path, str(i))] = v.start_mark.line + 1
                walk(v, (*path, str(i)))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return index


def parse_profile(text: str, source: str, overrides: dict[str, Any] | None = None) -> Profile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: a profile must be a YAML mapping")
    data.setdefault("name", Path(source).stem)
    for dotted, value in (overrides or {}).items():
        target = data
        *heads, last = dotted.split(".")
        for h in heads:
            target = target.setdefault(h, {})
        target[last] = value
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        line = _line_index(text).get(loc)
        where = f" (line {line})" if line else ""
        key = ".".join(loc) or "profile"
        if err["type"] == "extra_forbidden":
            raise InputError(f"{source}: unknown key {key!r}{where}") from None
        raise InputError(f"{source}: {key}{where}: {err['msg']}") from None


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Profile:
    """Load a built-in profile by name or a user's YAML file by path."""
    s = str(name_or_path)
    path = Path(s)
    if s.endswith((".yaml", ".yml")) or os.sep in s:
        if not path.is_file():
            raise InputError(f"profile file not found: {s}")
        return parse_profile(path.read_text(), s, overrides)
    builtin = BUILTIN_DIR / f"{s}.yaml"
    if not builtin.is_file():
        raise InputError(f"unknown profile {s!r}; known: {', '.join(builtin_names())} (or give a path to a YAML file)")
    return parse_profile(builtin.read_text(), s, overrides)
