"""The on-device build and profile commands (one template): `kdtoolkit build` and its trtexec equivalent, and build_on_device.sh.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from kdtoolkit.backends.trt.config import _profile_shapes, resolve_config
from kdtoolkit.backends.trt.version import build_path
from kdtoolkit.errors import InputError

if TYPE_CHECKING:

    from kdtoolkit.targets import Profile
else:
    pass


# implicit INT8 without a cache calibrates on the device from data given there: never a path of the machine
# that wrote the commands (it does not exist on the device)
CALIB_DATA_ARG = '"${CALIB_DATA:?set CALIB_DATA to calibration images on this device (ImageFolder, .npz or .npy)}"'


def _shell_quote(s: str) -> str:
    import shlex

    return s if s == CALIB_DATA_ARG else shlex.quote(s)


def build_commands(onnx_path: str | os.PathLike[str], profile: Profile, *, calib_data: str | None = None,
                   onnx_name: str = "model.onnx", calib_cache_name: str | None = None, stripped_onnx_name: str | None = None,
                   plan_name: str = "model.plan", engine_dir: str = "engine") -> dict[str, Any]:
    """The exact on-device commands for a TensorRT profile: `kdtoolkit build` and its trtexec equivalent (8.5 .. 10.x).

    The trtexec line never asks for INT8 it cannot get right: a Q/DQ ONNX is explicit INT8 (plus FP16 for
    the layers left in float, as `kdtoolkit build` sets both); an ONNX without Q/DQ is INT8 only with a
    calibration cache that exists (trtexec's ``--int8`` alone uses placeholder ranges and ``--calib=FILE``
    with FILE missing calibrates on random data), else FP16, and says so. DLA below TensorRT 11 builds the
    Q/DQ-free ONNX with the cache written from the Q/DQ scales. ``calib_data`` (the run's data source) is
    only named in a note: the device needs its own path (``$CALIB_DATA``).
    """
    import onnx as onnx_lib

    from kdtoolkit.quant.qdq_rules import has_qdq

    model = onnx_lib.load(str(onnx_path))
    qdq = has_qdq(model)
    cfg = resolve_config(profile, has_qdq=qdq, timing_cache="timing.cache")
    oldest = build_path(profile.tensorrt.min_version) if profile.tensorrt is not None else build_path("8.5")
    dla = cfg.dla_core is not None
    int8 = cfg.precision == "int8"
    strip = bool(int8 and dla and qdq and not oldest.strongly_typed and calib_cache_name and stripped_onnx_name)
    implicit = bool(int8 and (not qdq or strip))
    kd = ["kdtoolkit", "build", onnx_name, "--profile", profile.name, "--out", engine_dir]
    if int8 and calib_cache_name:
        kd += ["--calib-cache", calib_cache_name]
    elif int8 and not qdq:
        kd += ["--calib-data", CALIB_DATA_ARG]
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim]
    # --memPoolSize: the number alone is MiB everywhere; a unit suffix is misread by trtexec 10.0 (MiB x suffix)
    te = ["trtexec", f"--onnx={stripped_onnx_name if strip else onnx_name}", f"--saveEngine={plan_name}",
          f"--memPoolSize=workspace:{cfg.workspace_mb}", "--timingCacheFile=timing.cache"]
    if oldest.builder_optimization_level:
        te.append(f"--builderOptimizationLevel={cfg.builder_optimization_level}")  # trtexec >= 8.6
    if dims and dims[0] == -1:
        try:
            mn, op, mx = _profile_shapes(dims, cfg, inp.name)
        except InputError:  # shapes the profile cannot take: `check` reports them; trtexec then needs them by hand
            mn = op = mx = tuple(dims)
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        te += [f"--minShapes={inp.name}:{shape(mn)}", f"--optShapes={inp.name}:{shape(op)}", f"--maxShapes={inp.name}:{shape(mx)}"]
    shapes = None
    if dims and dims[0] == -1:
        shapes = {inp.name: {"min": list(mn), "opt": list(op), "max": list(mx)}}
    te_precision = cfg.precision
    note = ""
    if int8 and implicit and not calib_cache_name:
        te_precision = "fp16"
        note = ("trtexec cannot calibrate from data and no calibration cache comes with this ONNX, so its line builds FP16; "
                "for INT8 run `kdtoolkit build` with CALIB_DATA set" + (f" (the run calibrated from {calib_data!r})" if calib_data else ""))
    if te_precision in ("fp16", "int8"):
        te.append("--fp16")
    if te_precision == "int8":
        te.append("--int8")
        if implicit:
            te.append(f"--calib={calib_cache_name}")
    if dla:
        te.append(f"--useDLACore={cfg.dla_core}")
        if cfg.gpu_fallback:
            te.append("--allowGPUFallback")
    return {"kdtoolkit": " ".join(_shell_quote(a) for a in kd), "trtexec": " ".join(_shell_quote(a) for a in te),
            "precision": cfg.precision, "trtexec_precision": te_precision, "implicit_int8": str(implicit),
            "calibration_cache": calib_cache_name or "", "onnx_for_trtexec": (stripped_onnx_name or onnx_name) if strip else onnx_name,
            "stripped_onnx": stripped_onnx_name if strip and stripped_onnx_name else "",
            "note": note,
            # what deploy/device_report.py builds with (TensorRT's Python API, no kdtoolkit on the device)
            "build": {"onnx": (stripped_onnx_name or onnx_name) if strip else onnx_name, "precision": cfg.precision,
                      "qdq": qdq and not strip, "calibration_cache": calib_cache_name if implicit and calib_cache_name else None,
                      "dla_core": cfg.dla_core, "gpu_fallback": cfg.gpu_fallback, "workspace_mb": cfg.workspace_mb,
                      "shapes": shapes}}


def build_script(cmds: dict[str, str], profile: Profile, counts: dict[str, int]) -> str:
    """build_on_device.sh: kdtoolkit build when installed, else the trtexec equivalent."""
    notes = []
    if cmds.get("calibration_cache"):
        notes.append(f"# implicit INT8: both lines read the calibration cache {cmds['calibration_cache']} (scales from the Q/DQ ONNX)"
                     + (f";\n# trtexec builds {cmds['stripped_onnx']}, the same graph without Q/DQ nodes" if cmds.get("stripped_onnx") else ""))
    elif cmds["implicit_int8"] == "True":
        notes.append("# implicit INT8: kdtoolkit build calibrates on the device from CALIB_DATA (set it to calibration images here)")
    if cmds.get("note"):
        notes.append("# " + cmds["note"])
    note = "".join(n + "\n" for n in notes)
    te_args = cmds["trtexec"].split(" ", 1)[1]
    return (
        "#!/usr/bin/env bash\n"
        f"# Build the TensorRT engine for profile {profile.name} ON THE TARGET DEVICE: engines are tied to the GPU\n"
        "# and the TensorRT version. Nothing here was built or timed on the machine that wrote this file.\n"
        f"# Static check of model.onnx against the profile: {counts['error']} error(s), {counts['warning']} warning(s) (check.json).\n"
        "# The trtexec line is for TensorRT 8.5 .. 10.x; on TensorRT >= 11 use kdtoolkit build (strongly typed path).\n"
        f"{note}"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        + (f"[ -f {_shell_quote(cmds['calibration_cache'])} ] || {{ echo {_shell_quote('error: ' + cmds['calibration_cache'] + ' is missing; without it trtexec would calibrate on random data')} >&2; exit 2; }}\n"
           if cmds.get("calibration_cache") else "")
        + 'if command -v kdtoolkit >/dev/null 2>&1 && [ "${USE_TRTEXEC:-0}" != 1 ]; then\n'
        f"  {cmds['kdtoolkit']}\n"
        "else\n"
        '  TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"\n'
        + (f"  echo {_shell_quote('note: ' + cmds['note'])} >&2\n" if cmds.get("note") else "")
        + f"  \"$TRTEXEC\" {te_args}\n"
        "fi\n"
    )
