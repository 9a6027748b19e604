#!/usr/bin/env bash
# Build a TensorRT engine on the target device from a kdtoolkit bundle's ONNX, with the settings
# of the bundle's profile (batch range, precision, workspace, DLA, timing cache), then time it.
#
#   bash deploy/build_on_device.sh BUNDLE            # kdtoolkit build when installed, else trtexec
#   USE_TRTEXEC=1 bash deploy/build_on_device.sh BUNDLE
#
# Needs only bash, python3 (standard library) and trtexec (JetPack: /usr/src/tensorrt/bin/trtexec).
# Engines are tied to the GPU and TensorRT version: build on the device that will run it.
set -euo pipefail
BUNDLE="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
cd "$BUNDLE"
[ -f manifest.json ] || { echo "error: $BUNDLE is not a kdtoolkit bundle (no manifest.json)" >&2; exit 2; }
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
PROFILE="$(python3 -c 'import json; print(json.load(open("manifest.json"))["profile"]["name"])')"
ONNX="$(python3 -c 'import json; print(json.load(open("manifest.json"))["runtime"]["onnx"])')"
PLAN="model/model.plan"

# the build lines: the manifest's own (kdtoolkit wrote them for this bundle), else derived from its profile
# with the same rules: auto = INT8 only for a Q/DQ ONNX, else FP16; INT8 on a GPU also sets FP16 (as
# kdtoolkit build does); an ONNX without Q/DQ gets --int8 only with a calibration cache the bundle ships
# (trtexec's --int8 alone uses placeholder ranges, --calib=FILE with FILE missing calibrates on random data)
LINES="$(python3 - "$ONNX" "$PLAN" <<'PY'
import json, os, shlex, sys
m = json.load(open("manifest.json"))
onnx, plan = sys.argv[1], sys.argv[2]
cmds = (m.get("on_device") or {}).get("commands") or {}
p, t = m["profile"], m["profile"].get("tensorrt") or {}
qdq = bool(m["model"].get("qdq"))
cache = next((f for f in m["files"] if f.startswith("model/") and f.endswith((".cache", ".calib")) and "timing" not in f), None)
if cache and not os.path.isfile(cache):
    sys.exit("error: the manifest lists %s but it is missing; without it trtexec would calibrate on random data" % cache)
prec = p["precision"]
if prec == "auto":
    prec = "int8" if qdq else "fp16"
note = ""
kd = cmds.get("kdtoolkit_build")
if not kd:
    kd = "kdtoolkit build %s --profile %s --out engine" % (shlex.quote(onnx), shlex.quote(p["name"]))
    if prec == "int8" and cache:
        kd += " --calib-cache " + shlex.quote(cache)
    elif prec == "int8" and not qdq:
        kd += ' --calib-data "${CALIB_DATA:?set CALIB_DATA to calibration images on this device}"'
te = cmds.get("trtexec_build")
if te:
    args = shlex.split(te)[1:]
else:
    inp = m["inputs"][0]
    args = ["--onnx=%s" % onnx, "--saveEngine=%s" % plan, "--memPoolSize=workspace:%d" % int(t.get("workspace_mb", 1024))]
    if p.get("static_input_shape") is None and not isinstance(inp["shape"][0], int):
        dims = lambda b: "x".join(str(v) for v in [b] + list(inp["shape"][1:]))
        b = p["batch"]
        args += ["--minShapes=%s:%s" % (inp["name"], dims(b["min"])), "--optShapes=%s:%s" % (inp["name"], dims(b["opt"])),
                 "--maxShapes=%s:%s" % (inp["name"], dims(b["max"]))]
    if prec == "int8" and not qdq and not cache:
        note = "note: trtexec cannot calibrate from data and the bundle ships no calibration cache: building FP16 (use kdtoolkit build with CALIB_DATA for INT8)"
        prec = "fp16"
    if prec in ("fp16", "int8"):
        args.append("--fp16")
    if prec == "int8":
        args.append("--int8")
        if not qdq:
            args.append("--calib=%s" % cache)
    if t.get("dla_core") is not None:
        args.append("--useDLACore=%s" % t["dla_core"])
        if t.get("gpu_fallback", True):
            args.append("--allowGPUFallback")
    if t.get("timing_cache"):
        args.append("--timingCacheFile=%s" % t["timing_cache"])
print(kd)
print(" ".join(args))
print(note)
PY
)"
KD_LINE="$(sed -n 1p <<<"$LINES")"
read -r -a ARGS <<<"$(sed -n 2p <<<"$LINES")"
NOTE="$(sed -n 3p <<<"$LINES")"

if command -v kdtoolkit >/dev/null 2>&1 && [ "${USE_TRTEXEC:-0}" != 1 ]; then
  # kdtoolkit's builder reads the installed TensorRT version and takes the matching path
  echo "+ $KD_LINE"
  eval "$KD_LINE"
  cp engine/model.plan "$PLAN"
else
  [ -x "$TRTEXEC" ] || { echo "error: trtexec not found (set TRTEXEC=/path/to/trtexec)" >&2; exit 2; }
  [ -z "$NOTE" ] || echo "$NOTE" >&2
  HELP="$("$TRTEXEC" --help 2>&1 || true)"
  EXTRA=()
  # --builderOptimizationLevel exists from TensorRT 8.6; --skipInference replaced --buildOnly in 8.6
  if grep -q -- --builderOptimizationLevel <<<"$HELP" && ! grep -q -- --builderOptimizationLevel <<<"${ARGS[*]}"; then
    LVL="$(python3 -c 'import json; print((json.load(open("manifest.json"))["profile"].get("tensorrt") or {}).get("builder_optimization_level", 3))')"
    EXTRA+=("--builderOptimizationLevel=$LVL")
  fi
  if grep -q -- --skipInference <<<"$HELP"; then EXTRA+=(--skipInference); else EXTRA+=(--buildOnly); fi
  echo "+ $TRTEXEC ${ARGS[*]} ${EXTRA[*]}"
  "$TRTEXEC" "${ARGS[@]}" "${EXTRA[@]}"
fi

# serve it from the bundle's Triton entry too
for d in triton/*/; do mkdir -p "$d/1" && cp "$PLAN" "$d/1/model.plan"; done

# the latency on the device: the figure a bundle built elsewhere could not measure
SHAPE="$(python3 -c '
import json; m = json.load(open("manifest.json")); i = m["inputs"][0]
print("" if isinstance(i["shape"][0], int) else "--shapes=%s:%s" % (i["name"], "x".join(str(v) for v in [m["profile"]["batch"]["opt"], *i["shape"][1:]])))')"
"$TRTEXEC" --loadEngine="$PLAN" $SHAPE --warmUp=500 --duration=10 --useSpinWait --exportTimes=trtexec_times.json
echo "engine: $BUNDLE/$PLAN; next: python3 deploy/device_report.py $BUNDLE [--data IMAGES_OR_NPZ] (writes device_report.json)"
