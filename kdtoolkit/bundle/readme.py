"""The bundle's README.md and the on-device build script and commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def on_device_commands(onnx_src: Path, profile: Any, inp: dict[str, Any], *, calib_data: str | None = None,
                       calib_cache: str | None = None, stripped_onnx: str | None = None) -> dict[str, Any]:
    """The on-device build and timing commands, run from the bundle root.

    The build lines come from the engine module (one source of truth for how kdtoolkit builds for a
    profile), written with the bundle's paths (model/model.onnx -> model/model.plan, and the shipped
    calibration cache and Q/DQ-free ONNX where the profile needs them).
    """
    from kdtoolkit.backends.trt.commands import build_commands

    c = build_commands(onnx_src, profile, calib_data=calib_data, onnx_name="model/model.onnx", calib_cache_name=calib_cache,
                       stripped_onnx_name=stripped_onnx, plan_name="model/model.plan")
    te = c["trtexec"]
    shape = ""
    if profile.static_input_shape is None and not isinstance(inp["shape"][0], int):
        shape = f" --shapes={inp['name']}:" + "x".join(str(v) for v in [profile.batch.opt, *inp["shape"][1:]])
    return {
        "kdtoolkit_build": c["kdtoolkit"],
        "trtexec_build": te,
        "trtexec_profile": f"trtexec --loadEngine=model/model.plan{shape} --warmUp=500 --duration=10 --useSpinWait "
                           "--exportTimes=trtexec_times.json",
        "kdtoolkit_profile": f"kdtoolkit profile model/model.plan --profile {profile.name}",
        "device_report": "python3 deploy/device_report.py . [--data IMAGES_OR_NPZ]",
        "precision": c["precision"],
        "trtexec_precision": c["trtexec_precision"],
        "implicit_int8": c["implicit_int8"],
        "calibration_cache": c["calibration_cache"],
        "note": c["note"],
        "_build": c["build"],  # not a command: moved to on_device.build by make_bundle
    }

def _build_script(profile: Any, cmds: dict[str, str]) -> str:
    """build_on_device.sh at the bundle root: build (kdtoolkit build, else trtexec), install into Triton, time it."""
    precheck = ""
    if cmds.get("calibration_cache"):
        note = f"# implicit INT8: both builds read {cmds['calibration_cache']} (the Q/DQ scales, written off the device)\n"
        precheck = (f"[ -f {cmds['calibration_cache']} ] || {{ echo 'error: {cmds['calibration_cache']} is missing; without it "
                    "trtexec would calibrate on random data' >&2; exit 2; }\n")
    elif cmds["implicit_int8"] == "True":
        note = "# implicit INT8: kdtoolkit build calibrates on this device from CALIB_DATA (set it to calibration images here)\n"
    else:
        note = ""
    if cmds.get("note"):
        note += f"# {cmds['note']}\n"
    te_args = cmds["trtexec_build"].split(" ", 1)[1]
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for profile '{profile.name}' ON THE TARGET DEVICE from this bundle's ONNX, with the
# settings of the run, then time it. Engines are tied to the GPU and TensorRT version; nothing in this bundle
# was built or timed on the device. The trtexec line is for TensorRT 8.5 .. 10.x (JetPack: /usr/src/tensorrt/bin).
{note}set -euo pipefail
cd "$(dirname "$0")"
{precheck}TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if command -v kdtoolkit >/dev/null 2>&1 && [ "${{USE_TRTEXEC:-0}}" != 1 ]; then
  # kdtoolkit's builder reads the installed TensorRT version and takes the matching path
  {cmds['kdtoolkit_build']}
  cp engine/model.plan model/model.plan
else
  # build only (--skipInference from TensorRT 8.6, --buildOnly before)
  if "$TRTEXEC" --help 2>&1 | grep -q -- --skipInference; then ONLY=--skipInference; else ONLY=--buildOnly; fi
  "$TRTEXEC" {te_args} $ONLY
fi
for d in triton/*/; do mkdir -p "$d/1" && cp model/model.plan "$d/1/model.plan"; done
# the latency on the device: the figure this bundle could not measure off the device
"$TRTEXEC" {cmds['trtexec_profile'].split(' ', 1)[1]}
echo "engine: model/model.plan; next: python3 deploy/device_report.py . [--data IMAGES_OR_NPZ] (writes device_report.json)"
"""

def _readme(m: dict[str, Any]) -> str:
    inp, out = m["inputs"][0], m["outputs"][0]
    pre = m["preprocessing"]
    acc = m["metrics"]["accuracy"]
    lat = m["metrics"]["latency_ms"]
    lines = [f"# {m['name']}: kdtoolkit bundle", "",
             f"Profile `{m['profile']['name']}` ({m['profile']['backend']}, {m['profile']['device']}), precision {m['model']['precision']}.", "",
             "## Feeding the model", "",
             f"- input `{inp['name']}` {inp['dtype']} shape {inp['shape']} layout {pre['layout']}",
             f"- image: {pre['color']} {pre['input_size'][0]}x{pre['input_size'][1]} (resize {pre['resize']}), "
             f"x = (pixel / 255 - mean) / std with mean {pre['mean']} std {pre['std']}",
             *([f"- output `{out['name']}` {out['dtype']} shape {out['shape']}: logits over {len(m['classes'])} classes (labels.txt, in order)"]
               if m["postprocessing"]["kind"] == "logits" else
               [f"- output `{o['name']}` {o['dtype']} shape {o['shape']} (raw: not class logits, no postprocessing applied)"
                for o in m["outputs"]]), "",
             "## Measured", "",
             f"- top-1 accuracy {100 * acc['value']:.2f} % on {acc.get('n_test', '?')} test images ({acc['runtime']})"
             if acc.get("value") is not None else
             "- top-1 accuracy: n/a (the outputs are not class logits); the reference outputs are checked output by output"]
    for b, v in sorted(lat["by_batch"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"- latency batch {b}: p50 {v['p50']:.3f} ms, p90 {v['p90']:.3f} ms ({lat['runtime']})")
    lines += ["", "## Needs the device", "", m["on_device"]["statement"], ""]
    lines += ["## Use", "",
              "```", "kdtoolkit verify .                                # hashes + reference outputs",
              "python deploy/infer_onnx.py . IMAGE_OR_FOLDER [--json]   # numpy + pillow + onnxruntime only",
              "```"]
    if m["on_device"]["required"]:
        lines += ["", "On the device: `bash build_on_device.sh` (kdtoolkit build, or the trtexec equivalent below).", "",
                  "```", m["on_device"]["commands"]["trtexec_build"], m["on_device"]["commands"]["trtexec_profile"], "```"]
    lines += ["", f"Triton: copy `triton/{m['name']}` into a model repository ({m['triton']['platform']}).", ""]
    return "\n".join(lines)
