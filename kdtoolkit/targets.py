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
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

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
    mode: Literal["auto", "static", "dynamic"] = Field(
        "auto", description="static QDQ (calibrated), or dynamic (ORT CPU only: int8 MatMul/Gemm weights, activation ranges at run "
                            "time); auto = dynamic for a transformer graph on ONNX Runtime (measured faster and as accurate, "
                            "benchmarks/results/vit_int8.json), static otherwise")
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
    # How the user asked for it (an alias such as "jetson-agx"), kept out of the fields so that it never
    # changes a dump, a manifest or a stage's cache key: "jetson-agx" and "jetson-agx-orin" are one target.
    _requested_as: str | None = PrivateAttr(None)

    @property
    def requested_as(self) -> str | None:
        """The alias the profile was asked for by (e.g. "jetson-agx"), or None when asked by its own name or a file."""
        return self._requested_as

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


# Names people type for the built-in profiles. `jetson-agx` is the spelling of our own headline command
# and means AGX Orin (the current AGX); AGX Xavier has its own profile and names.
ALIASES: dict[str, str] = {
    "jetson-agx": "jetson-agx-orin", "agx-orin": "jetson-agx-orin", "orin-agx": "jetson-agx-orin",
    "jetson-orin-agx": "jetson-agx-orin",
    "orin-dla": "jetson-agx-orin-dla", "agx-orin-dla": "jetson-agx-orin-dla", "jetson-agx-dla": "jetson-agx-orin-dla",
    "jetson-orin-dla": "jetson-agx-orin-dla",
    "orin-nano": "jetson-orin-nano", "jetson-nano-orin": "jetson-orin-nano", "nano-orin": "jetson-orin-nano",
    "orin-nano-8gb": "jetson-orin-nano",
    "orin-nx": "jetson-orin-nx", "jetson-nx-orin": "jetson-orin-nx", "nx-orin": "jetson-orin-nx",
    "jetson-xavier": "jetson-agx-xavier", "agx-xavier": "jetson-agx-xavier", "xavier-agx": "jetson-agx-xavier",
    "jetson-xavier-agx": "jetson-agx-xavier",
    "xavier-nx": "jetson-xavier-nx", "jetson-nx-xavier": "jetson-xavier-nx", "nx-xavier": "jetson-xavier-nx",
    "cpu": "ort-cpu", "onnxruntime": "ort-cpu", "onnxruntime-cpu": "ort-cpu", "ort": "ort-cpu", "x86": "ort-cpu",
    "x86-cpu": "ort-cpu",
    "gpu": "desktop-gpu", "cuda": "desktop-gpu", "dgpu": "desktop-gpu", "desktop": "desktop-gpu",
    "tensorrt": "desktop-gpu", "trt": "desktop-gpu", "nvidia-gpu": "desktop-gpu",
}

# Devices below our TensorRT floor: their last JetPack is 4.6.x, whose TensorRT is 8.2 (JetPack 5, the
# first with TensorRT 8.5, supports only Xavier and Orin).
_JETPACK4 = ("its last JetPack is 4.6 with TensorRT 8.2, and kdtoolkit needs TensorRT 8.5 or newer "
             "(JetPack 5.1+: Xavier or Orin)")
_NANO = f"the original Jetson Nano (Maxwell GPU) is not supported: {_JETPACK4}; for the Orin Nano use jetson-orin-nano"
_TX2 = f"the Jetson TX2 (Pascal GPU) is not supported: {_JETPACK4}"
_TX1 = f"the Jetson TX1 (Maxwell GPU) is not supported: {_JETPACK4}"
UNSUPPORTED: dict[str, str] = {
    "jetson-nano": _NANO, "jetson-nano-2gb": _NANO, "jetson-nano-4gb": _NANO, "nano-2gb": _NANO, "nano-4gb": _NANO,
    "nano": f"for the Orin Nano use jetson-orin-nano; {_NANO.split('; for the Orin')[0]}",
    "jetson-tx2": _TX2, "tx2": _TX2, "jetson-tx2-nx": _TX2, "tx2-nx": _TX2, "jetson-tx1": _TX1, "tx1": _TX1,
}

# Names that fit several supported devices: answered with the choices rather than a guess.
AMBIGUOUS: dict[str, tuple[str, ...]] = {
    "orin": ("jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano"),
    "jetson-orin": ("jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano"),
    "xavier": ("jetson-agx-xavier", "jetson-xavier-nx"),
    "nx": ("jetson-orin-nx", "jetson-xavier-nx"),
    "jetson-nx": ("jetson-orin-nx", "jetson-xavier-nx"),
    "agx": ("jetson-agx-orin", "jetson-agx-xavier"),
    "jetson": ("jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano", "jetson-agx-xavier", "jetson-xavier-nx"),
}


def _normalise(name: str) -> str:
    """Case, spaces, underscores and an 'nvidia' prefix do not matter: "NVIDIA Jetson_AGX" is jetson-agx."""
    s = "-".join(name.strip().lower().replace("_", " ").replace("-", " ").split())
    return s.removeprefix("nvidia-")


def aliases_of(canonical: str) -> list[str]:
    """The aliases that resolve to one built-in profile, for `profiles list`."""
    return sorted(a for a, c in ALIASES.items() if c == canonical)


def resolve_profile_name(name: str) -> tuple[str, str | None]:
    """Map a profile name as typed to a built-in profile: (canonical name, the alias used or None).

    Refuses in one line, naming why: a device below our TensorRT floor, a name that fits several
    devices, or an unknown name (with difflib's "did you mean").
    """
    key = _normalise(name)
    known = builtin_names()
    if key in known:
        return key, (None if name == key else name)
    if key in ALIASES and ALIASES[key] in known:
        return ALIASES[key], name
    if key in UNSUPPORTED:
        raise InputError(f"profile {name!r}: {UNSUPPORTED[key]}")
    if key in AMBIGUOUS:
        raise InputError(f"profile {name!r} fits several devices; pick one: {', '.join(AMBIGUOUS[key])} "
                         "(kdtoolkit profiles list shows every name and alias)")
    import difflib

    vocabulary = sorted({*known, *(a for a, c in ALIASES.items() if c in known)})
    scored = sorted(((difflib.SequenceMatcher(None, key, v).ratio(), v) for v in vocabulary), reverse=True)
    best = scored[0][0] if scored else 0.0
    close: list[str] = []
    for ratio, match in scored:  # only the near-best matches: a hint that lists half the catalogue is noise
        if ratio < max(0.6, best - 0.08):
            break
        canonical = match if match in known else ALIASES[match]
        if canonical not in close:
            close.append(canonical)
    hint = f"did you mean {' or '.join(close[:3])}? " if close else ""
    raise InputError(f"unknown profile {name!r}; {hint}known: {', '.join(known)} "
                     "(kdtoolkit profiles list shows their aliases; or give a path to a YAML file)")


def load_profile(name_or_path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Profile:
    """Load a built-in profile by name or alias (see resolve_profile_name), or a user's YAML file by path."""
    s = str(name_or_path)
    path = Path(s)
    if s.endswith((".yaml", ".yml")) or os.sep in s:
        if not path.is_file():
            raise InputError(f"profile file not found: {s}")
        return parse_profile(path.read_text(), s, overrides)
    canonical, alias = resolve_profile_name(s)
    profile = parse_profile((BUILTIN_DIR / f"{canonical}.yaml").read_text(), canonical, overrides)
    profile._requested_as = alias
    return profile
