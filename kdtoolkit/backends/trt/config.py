"""The resolved build configuration: a profile (plus flags) becomes a BuildConfig, stored in the engine's manifest.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdtoolkit.backends.trt.version import BuildPath
from kdtoolkit.errors import InputError

if TYPE_CHECKING:

    from kdtoolkit.targets import Profile
else:
    pass


class BuildConfig(BaseModel):
    """Everything a build depends on, resolved from the profile and flags; stored in the manifest."""

    model_config = ConfigDict(extra="forbid")
    precision: Literal["int8", "fp16", "fp32"] = Field(description="resolved precision (auto is resolved before building)")
    precision_reason: str = Field("", description="why this precision (profile, flag, or the auto rule)")
    batch_min: int = Field(1, ge=1, description="optimisation profile: smallest batch")
    batch_opt: int = Field(1, ge=1, description="optimisation profile: batch tuned for")
    batch_max: int = Field(1, ge=1, description="optimisation profile: largest batch")
    static_input_shape: list[int] | None = Field(None, description="pinned N,C,H,W (DLA / profiles that need static shapes)")
    workspace_mb: int = Field(1024, ge=16, description="builder workspace (set_memory_pool_limit WORKSPACE)")
    builder_optimization_level: int = Field(3, ge=0, le=5, description="TensorRT builder optimisation level (>= 8.6)")
    dla_core: int | None = Field(None, description="DLA core, or None for the GPU")
    gpu_fallback: bool = Field(True, description="let DLA layers fall back to the GPU")
    timing_cache: str | None = Field(None, description="timing cache file reused across builds")
    calib_batch_size: int = Field(8, ge=1, description="batch size fed to the entropy calibrator")
    calib_size: int = Field(512, ge=1, description="calibration samples")
    calib_cache: str | None = Field(None, description="calibration cache to read (and write) for implicit INT8")


def resolve_config(profile: Profile, *, has_qdq: bool, precision: str | None = None, timing_cache: str | None = None,
                   calib_cache: str | None = None, trt_path: BuildPath | None = None, device_key: str | None = None) -> BuildConfig:
    """Turn a profile (plus flags) into a BuildConfig; ``auto`` becomes int8 for a Q/DQ ONNX, else fp16.

    A relative profile timing cache lives in kdtoolkit's cache under the TensorRT version AND the device
    (GPU name + compute capability, ``device_key``): a cache from another GPU is useless to TensorRT.
    """
    if not profile.is_tensorrt or profile.tensorrt is None:
        raise InputError(f"profile {profile.name} has backend {profile.backend}; `build` makes TensorRT engines: pick a tensorrt profile")
    t = profile.tensorrt
    p = precision or profile.precision
    reason = "from --precision" if precision else f"from profile {profile.name}"
    if p == "auto":
        p, reason = ("int8", "auto: the ONNX carries Q/DQ") if has_qdq else ("fp16", "auto: no Q/DQ in the ONNX and no measurement at build time")
    if p not in ("int8", "fp16", "fp32"):
        raise InputError(f"precision must be int8, fp16, fp32 or auto, got {p!r}")
    resolved: Literal["int8", "fp16", "fp32"] = "int8" if p == "int8" else "fp16" if p == "fp16" else "fp32"
    b = profile.batch
    static = profile.static_input_shape
    bmin, bopt, bmax = (static[0],) * 3 if static else (b.min, b.opt, b.max)
    if t.dla_core is not None and bmin != bmax:
        bmin = bopt = bmax = b.opt  # DLA: no dynamic dimensions, min = opt = max
    cache = timing_cache
    if cache is None and t.timing_cache:
        cache = t.timing_cache
        if not os.path.isabs(cache):
            from kdtoolkit.data.datasets import cache_dir

            v = ".".join(map(str, trt_path.version)) if trt_path else "unknown"
            cache = str(cache_dir() / "tensorrt" / f"trt-{v}" / (device_key or "unknown-device") / cache)
    return BuildConfig(
        precision=resolved, precision_reason=reason, batch_min=bmin, batch_opt=bopt, batch_max=bmax, static_input_shape=static,
        workspace_mb=t.workspace_mb, builder_optimization_level=t.builder_optimization_level, dla_core=t.dla_core,
        gpu_fallback=t.gpu_fallback, timing_cache=cache, calib_size=profile.quant.calib_size,
        calib_batch_size=max(1, min(32, bmax)) if t.dla_core is None else bopt, calib_cache=calib_cache,
    )


def _profile_shapes(dims: list[int], cfg: BuildConfig, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    if cfg.static_input_shape is not None:
        s = tuple(cfg.static_input_shape)
        if len(s) != len(dims) or any(d not in (-1, v) for d, v in zip(dims, s)):
            raise InputError(f"input {name} has shape {dims}, which does not fit the profile's static shape {list(s)}")
        return s, s, s
    if any(d < 0 for d in dims[1:]):
        raise InputError(f"input {name} has dynamic non-batch axes {dims}; expected only the batch axis to be dynamic")
    if dims[0] >= 0:
        if not cfg.batch_min <= dims[0] <= cfg.batch_max or cfg.batch_min != cfg.batch_max:
            raise InputError(f"input {name} has a fixed batch {dims[0]}, but the profile asks for batch "
                             f"{cfg.batch_min}..{cfg.batch_max}; export with a dynamic batch axis")
        s = tuple(dims)
        return s, s, s
    rest = tuple(dims[1:])
    return (cfg.batch_min, *rest), (cfg.batch_opt, *rest), (cfg.batch_max, *rest)


def gpu_cache_key(name: str, capability: tuple[int, int] | None) -> str:
    """A file-name-safe key for a GPU: its name and compute capability ('NVIDIA A10', (8, 6) -> 'NVIDIA-A10-sm86')."""
    import re

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.strip()).strip("-") or "unknown-gpu"
    return f"{slug}-sm{capability[0]}{capability[1]}" if capability else slug
