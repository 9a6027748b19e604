"""What this machine can do: library versions, CPU flags, GPU, Jetson details. Import-light."""

from __future__ import annotations

import functools
import importlib.metadata as md
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

# CPU features that decide whether INT8 pays on a CPU (DESIGN.md: no VNNI -> INT8 is not faster).
_FLAG_NAMES = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "asimddp": "arm_dotprod",
    "i8mm": "arm_i8mm",
}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and model in ("", platform.machine(), platform.processor()):
                model = val.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    found = {nice: (raw in flags) for raw, nice in _FLAG_NAMES.items()}
    return {
        "model": model,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "flags": found,
        "vnni": bool(found["avx512_vnni"] or found["avx_vnni"] or found["amx_int8"]),
        "arm_dotprod": found["arm_dotprod"],
    }


def int8_pays_on_cpu() -> bool:
    """INT8 kernels beat FP32 on x86 only with VNNI/AMX, on ARM with dot-product instructions."""
    c = cpu_info()
    return bool(c["vnni"] or c["arm_dotprod"])


@functools.lru_cache(maxsize=1)
def jetson_info() -> dict[str, Any] | None:
    rel = Path("/etc/nv_tegra_release")
    if not rel.exists():
        return None
    info: dict[str, Any] = {"l4t": rel.read_text().splitlines()[0].strip()}
    for name, p in {"power_mode": "/etc/nvpmodel.conf"}.items():
        if Path(p).exists():
            info[name + "_conf"] = p
    try:
        import subprocess

        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5)
        info["power_mode"] = out.stdout.strip().splitlines()[0] if out.stdout else None
    except (OSError, subprocess.SubprocessError):
        info["power_mode"] = None
    return info


def environment(*, with_torch: bool = True) -> dict[str, Any]:
    """Versions and hardware recorded in every manifest and profile report."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kdtoolkit": _version("kdtoolkit"),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "tensorrt": _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13"),
        "cpu": cpu_info(),
        "jetson": jetson_info(),
    }
    if with_torch and importlib.util.find_spec("torch") is not None:
        import torch

        env["torch_threads"] = torch.get_num_threads()
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return env


def ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def capabilities() -> dict[str, Any]:
    """`kdtoolkit env`: what is installed and what that means for each kind of profile."""
    env = environment()
    providers = ort_providers()
    trt = env["tensorrt"]
    notes = []
    if int8_pays_on_cpu():
        notes.append("CPU has VNNI/AMX or ARM dot-product: INT8 can beat FP32 on ONNX Runtime CPU.")
    else:
        notes.append("CPU has no VNNI/AMX: INT8 is usually not faster than FP32 on ONNX Runtime CPU; `auto` will measure.")
    if trt:
        notes.append(f"TensorRT {trt} found: `build` can make engines for this GPU.")
    else:
        notes.append("No TensorRT: TensorRT profiles go as far as QDQ ONNX + static check + build commands for the device.")
    if env.get("gpu"):
        notes.append(f"GPU {env['gpu']}: training and CUDA execution providers can use it.")
    return {**env, "onnxruntime_providers": providers, "notes": notes}
