#!/usr/bin/env bash
# Build a TensorRT engine on the target device from a kdtoolkit bundle's ONNX, with the settings
# of the bundle's profile (batch range, precision, workspace, DLA, timing cache), then time it.
#
#   bash deploy/build_on_device.sh BUNDLE            # kdtoolkit build when installed, else trtexec
#   USE_TRTEXEC=1 bash deploy/build_on_device.sh BUNDLE
#
# Needs only bash, python3 (json module) and trtexec (JetPack: /usr/src/tensorrt/bin/trtexec).
# Engines are tied to the GPU and TensorRT version: build on the device that will run it.
set -euo pipefail
BUNDLE="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
cd "$BUNDLE"
[ -f manifest.json ] || { echo "error: $BUNDLE is not a kdtoolkit bundle (no manifest.json)" >&2; exit 2; }
TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
PROFILE="$(python3 -c 'import json; print(json.load(open("manifest.json"))["profile"]["name"])')"
ONNX="$(python3 -c 'import json; print(json.load(open("manifest.json"))["runtime"]["onnx"])')"
PLAN="model/model.plan"

if command -v kdtoolkit >/dev/null 2>&1 && [ "${USE_TRTEXEC:-0}" != 1 ]; then
  # kdtoolkit's builder reads the installed TensorRT version and takes the matching path
  kdtoolkit build "$ONNX" --profile "$PROFILE" --out engine
  cp engine/model.plan "$PLAN"
else
  [ -x "$TRTEXEC" ] || { echo "error: trtexec not found (set TRTEXEC=/path/to/trtexec)" >&2; exit 2; }
  HELP="$("$TRTEXEC" --help 2>&1 || true)"
  # the trtexec arguments, derived from the manifest alone
  read -r -a ARGS < <(python3 - "$ONNX" "$PLAN" <<'PY'
import json, sys
m = json.load(open("manifest.json"))
onnx, plan = sys.argv[1], sys.argv[2]
p, t = m["profile"], m["profile"].get("tensorrt") or {}
inp = m["inputs"][0]
args = [f"--onnx={onnx}", f"--saveEngine={plan}"]
if p.get("static_input_shape") is None and not isinstance(inp["shape"][0], int):
    dims = lambda b: "x".join(str(v) for v in [b, *inp["shape"][1:]])
    b = p["batch"]
    args += [f"--minShapes={inp['name']}:{dims(b['min'])}", f"--optShapes={inp['name']}:{dims(b['opt'])}",
             f"--maxShapes={inp['name']}:{dims(b['max'])}"]
prec = p["precision"]
if prec in ("int8", "auto"):
    args.append("--int8")
    calib = [f for f in m["files"] if f.endswith((".cache", ".calib")) and f.startswith("model/")]
    if not m["model"].get("qdq") and calib:
        args.append(f"--calib={calib[0]}")
if prec in ("fp16", "auto") or (prec == "int8" and t.get("dla_core") is not None):
    args.append("--fp16")
if t.get("dla_core") is not None:
    args.append(f"--useDLACore={t['dla_core']}")
    if t.get("gpu_fallback", True):
        args.append("--allowGPUFallback")
args.append(f"--memPoolSize=workspace:{t.get('workspace_mb', 1024)}")
if t.get("timing_cache"):
    args.append(f"--timingCacheFile={t['timing_cache']}")
print(" ".join(args))
PY
)
  EXTRA=()
  # --builderOptimizationLevel exists from TensorRT 8.6; --skipInference replaced --buildOnly in 8.6
  if grep -q -- --builderOptimizationLevel <<<"$HELP"; then
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
echo "engine: $BUNDLE/$PLAN; next: python deploy/infer_tensorrt.py $BUNDLE IMAGE_OR_FOLDER"
