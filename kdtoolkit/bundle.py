"""The hand-off bundle: what an inference team receives, verifies and serves.

A bundle is a folder (or a .tar.gz of one) that someone without kdtoolkit can use: the
deployable model (ONNX, and the engine plan when one was built), ``manifest.json`` in its own
versioned format (``kdtoolkit.bundle/1``, documented by ``kdtoolkit/schemas/bundle-manifest.schema.json``)
that says how to feed the model and what it was built and measured with, a reference batch with
the outputs kdtoolkit's own ONNX Runtime evaluation gave, a Triton model repository entry, the
run's report, and the deploy scripts. ``verify`` re-checks all of it on the receiving side.

Figures are copied from what the run measured (summary.json, stage manifests); nothing is
estimated. For TensorRT profiles built off the device the target latency is stated as not
measured, with the commands that measure it on the device.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from kdtoolkit import fsutil
from kdtoolkit.errors import CheckFailed, InputError, MissingDependency

BUNDLE_SCHEMA = "kdtoolkit.bundle"
BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA_FILE = Path(__file__).parent / "schemas" / "bundle-manifest.schema.json"
# the deploy scripts: beside the package in a source checkout, or where KDTOOLKIT_DEPLOY_DIR says (docker image)
DEPLOY_DIR = Path(os.environ.get("KDTOOLKIT_DEPLOY_DIR") or Path(__file__).resolve().parents[1] / "deploy")
DEPLOY_SCRIPTS = ("infer_onnx.py", "infer_tensorrt.py", "build_on_device.sh", "trt_device.py", "device_report.py")

# Reference-output tolerance per precision: the same ONNX on another CPU or ORT build differs by
# float reassociation (fp32), more where reduced precision rounds differently.
TOLERANCE = {"fp32": {"atol": 1e-3, "rtol": 1e-3}, "fp16": {"atol": 5e-2, "rtol": 5e-2}, "int8": {"atol": 0.25, "rtol": 0.05}}
_WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}
_INT8_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm"}


# ----------------------------------------------------------------------------- reading a run


def _stage_artifacts(run_dir: Path) -> list[Any]:
    """Every finished stage artifact of the run, in stage order (found by stage name: kdtoolkit.run.RunDir)."""
    from kdtoolkit.run import RunDir

    return list(RunDir(run_dir).artifacts().values())


def find_final(run_dir: Path) -> tuple[Any, Any | None]:
    """The deployable ONNX (the optimize stage's) and the engine artifact when the run built one."""
    from kdtoolkit.run import RunDir

    return RunDir(run_dir).final()


def _resolve_parent(parent: Any, run_dir: Path) -> Any | None:
    """A parent's recorded path may be relative to another working directory: also try it inside the run."""
    from kdtoolkit.artifact import Artifact

    for cand in (Path(parent.path), run_dir / Path(parent.path).name):
        if Artifact.is_artifact(cand):
            try:
                art = Artifact.load(cand)
            except InputError:
                continue
            if art.fingerprint() == parent.fingerprint:
                return art
    return None


def lineage(final: Any, run_dir: Path) -> list[dict[str, Any]]:
    """Walk the stage manifests' ``parents`` back to the teacher: one node per artifact, newest first."""
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    queue = [final]
    while queue:
        art = queue.pop(0)
        fp = art.fingerprint()
        if fp in seen:
            continue
        seen.add(fp)
        mf = art.info.get("model_file") or next((n for n in art.manifest.files if n.endswith((".onnx", ".plan", ".engine", ".pt", ".pt2"))), None)
        node = {
            "stage": art.manifest.stage, "kind": art.kind, "folder": art.path.name, "fingerprint": fp,
            "created": art.manifest.created,
            "model_file": mf, "model_sha256": art.manifest.files[mf].sha256 if mf in art.manifest.files else None,
            "parents": [p.fingerprint for p in art.manifest.parents],
            "metrics": {k: art.metrics[k] for k in ("accuracy", "teacher_agreement", "params", "macs") if k in art.metrics},
        }
        if not art.manifest.parents and "model" in art.manifest.config:
            node["source"] = art.manifest.config.get("model")
        nodes.append(node)
        for p in art.manifest.parents:
            resolved = _resolve_parent(p, run_dir)
            if resolved is None:
                if p.fingerprint not in seen:
                    seen.add(p.fingerprint)
                    nodes.append({"stage": p.stage, "kind": p.kind, "folder": Path(p.path).name, "fingerprint": p.fingerprint,
                                  "parents": [], "missing": True})
            else:
                queue.append(resolved)
    return nodes


def layer_precision(onnx_path: Path) -> dict[str, dict[str, int]]:
    """Precision of each weighted layer group (op type -> precision -> count), read from the graph itself."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    g = m.graph
    producers = {o: n for n in g.node for o in n.output}
    init_types = {i.name: i.data_type for i in g.initializer}
    groups: dict[str, dict[str, int]] = {}
    for n in g.node:
        if n.op_type in _INT8_OPS:
            prec = "int8"
        elif n.op_type in _WEIGHTED_OPS and len(n.input) > 1:
            w = n.input[1]
            src = producers.get(w)
            if src is not None and src.op_type == "DequantizeLinear":
                prec = "int8"
            elif init_types.get(w) == onnx.TensorProto.FLOAT16:
                prec = "fp16"
            else:
                prec = "fp32"
        else:
            continue
        groups.setdefault(n.op_type, {}).setdefault(prec, 0)
        groups[n.op_type][prec] += 1
    return groups


def _io_from_onnx(onnx_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def desc(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return {"name": v.name, "shape": shape, "dtype": dtype}

    return [desc(v) for v in m.graph.input if v.name not in init], [desc(v) for v in m.graph.output]


# ----------------------------------------------------------------------------- pieces of the bundle


def _pick_samples(y: Any, n: int) -> list[int]:
    """A few real test images, taken round-robin over the classes so the batch covers the labels; in split order."""
    import numpy as np

    per_class = [list(np.where(y == c)[0]) for c in np.unique(y)]
    order: list[int] = []
    k = 0
    while len(order) < min(n, len(y)):
        for idx in per_class:
            if k < len(idx) and len(order) < n:
                order.append(int(idx[k]))
        k += 1
    return sorted(order)


def _triton_config(name: str, platform: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                   batch: dict[str, int], static: bool, gpu: bool) -> str:
    """A Triton model configuration (protobuf text format, ModelConfig) for the bundle's model."""
    tmap = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "int32": "TYPE_INT32",
            "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
    batched = not static and all(isinstance(d["shape"][0], str) or d["shape"][0] is None for d in inputs)
    max_batch = batch["max"] if batched else 0

    def dims(d: dict[str, Any]) -> str:
        shp = d["shape"][1:] if batched else d["shape"]
        return ", ".join(str(s if isinstance(s, int) else -1) for s in shp)

    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch}"]
    for key, items in (("input", inputs), ("output", outputs)):
        lines.append(f"{key} [")
        for i, d in enumerate(items):
            extra = '\n    label_filename: "labels.txt"' if key == "output" and i == 0 else ""
            lines.append(f'  {{\n    name: "{d["name"]}"\n    data_type: {tmap[d["dtype"]]}\n    dims: [ {dims(d)} ]{extra}\n  }}'
                         + ("," if i < len(items) - 1 else ""))
        lines.append("]")
    if batched:
        preferred = sorted({b for b in (batch["opt"], batch["max"]) if b > 1})
        lines.append("dynamic_batching {")
        if preferred:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]")
        lines.append("  max_queue_delay_microseconds: 100\n}")
    lines.append(f"instance_group [\n  {{\n    count: 1\n    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}\n  }}\n]")
    return "\n".join(lines) + "\n"


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


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)


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
             f"- output `{out['name']}` {out['dtype']} shape {out['shape']}: logits over {len(m['classes'])} classes (labels.txt, in order)", "",
             "## Measured", "",
             f"- top-1 accuracy {100 * acc['value']:.2f} % on {acc.get('n_test', '?')} test images ({acc['runtime']})"]
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


def _report_files(run_dir: Path) -> list[Path]:
    """report.md/html, plots and summary.json of the run (not the stage folders, the work folder or a bundle)."""
    from kdtoolkit.run import stage_folders

    stage_dirs = set(stage_folders().values())
    out = []
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir)
        top = rel.parts[0]
        if not p.is_file() or top in stage_dirs or top.startswith(".") or top.startswith("bundle"):
            continue
        if p.name in ("report.md", "report.html", "summary.json") or p.suffix.lower() in (".png", ".svg"):
            out.append(p)
    return out


# ----------------------------------------------------------------------------- make


def make_bundle(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, tar: bool = False, splits: Any = None,
                data: str | None = None, samples: int = 16, name: str | None = None) -> Path:
    """Write the bundle for a finished compress run; atomically (a temp folder or file renamed into place)."""
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise InputError(f"run folder not found: {run_dir}")
    deploy, engine = find_final(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise InputError(f"{run_dir}: no summary.json, so no measured figures to hand over; finish the run with `kdtoolkit compress`")
    from kdtoolkit.run import RunSummary

    summary = RunSummary.load(run_dir).to_dict()
    import numpy as np  # heavy imports only once the run is known to be usable

    from kdtoolkit.config import load_config
    from kdtoolkit.evaluate import predict
    from kdtoolkit.targets import load_profile

    deploy.check()
    cfg = load_config(run_dir / "config.yaml")
    profile = load_profile(cfg.profile, cfg.profile_overrides)
    from kdtoolkit.data.inputspec import InputSpec

    given = InputSpec.from_meta(deploy.info.get("model"))
    if given.input_size is None:
        raise InputError(f"{deploy.path}: the manifest holds no model input description (info.model)")
    onnx_src = deploy.file("model.onnx")

    # the reference batch: real test images, normalised exactly as kdtoolkit evaluates them
    if splits is None:
        from kdtoolkit.data import load_data

        d = cfg.data
        splits = load_data(data or d.source, input_size=given.input_size, channels=given.channels,
                           mean=given.mean, std=given.std, class_names=given.classes,
                           val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=d.seed,
                           on_bad_image=d.on_bad_image, train_limit=d.train_limit, test_limit=d.test_limit)
        if given.classes:
            splits.spec.classes = list(given.classes)
    spec = splits.spec
    inputs, outputs = _io_from_onnx(onnx_src)
    static_batch = inputs[0]["shape"][0] if isinstance(inputs[0]["shape"][0], int) else None
    if static_batch:  # a fixed-batch model (DLA) takes exactly that many images per run
        samples = static_batch
    idx = _pick_samples(splits.test.y, samples)
    if static_batch and len(idx) != static_batch:
        raise InputError(f"the model's batch is fixed at {static_batch} but the test split has only {len(idx)} images")
    sub = splits.test.subset(np.asarray(idx, dtype=np.int64))
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.data.datasets import to_tensor

    x_ref = to_tensor(sub.x, spec).numpy().astype(np.float32)
    batch = static_batch or max(1, min(len(sub), profile.batch.max))
    expected = predict(make_session(onnx_src), sub, spec, batch_size=batch).astype(np.float32)

    for d_ in inputs:
        d_["layout"] = spec.layout
    precision = deploy.metrics.get("precision") or deploy.info.get("precision") or "fp32"
    qdq = _has_qdq(onnx_src)
    model_name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"{_teacher_arch(deploy, run_dir) or 'model'}-{profile.name}")
    env_built = deploy.manifest.environment
    if engine is not None:  # the engine was built where the build stage ran, on its GPU
        trt_info = engine.info.get("tensorrt") or {}
        env_built = {**engine.manifest.environment, **({"gpu": trt_info["device"]} if trt_info.get("device") else {}),
                     **({"tensorrt": trt_info["version"]} if trt_info.get("version") else {})}
    prof_art = next((a for a in _stage_artifacts(run_dir) if a.kind == "profile"), None)
    env_measured = prof_art.manifest.environment if prof_art is not None else {}
    calib = next((a for a in _stage_artifacts(run_dir) if a.kind == "calibration"), None)

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        def put(rel: str, content: Path | str | None = None) -> Path:
            """A bundle path (parents made); a Path is copied there, a str written as text."""
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, p)
            elif isinstance(content, str):
                p.write_text(content)
            return p

        put("model/model.onnx", onnx_src)
        runtime = "onnxruntime"
        if engine is not None:
            put("model/model.plan", engine.first_file((".plan", ".engine")))
            runtime = "tensorrt"
        calib_file = None
        if not qdq:  # implicit INT8: the calibration cache lets trtexec rebuild with the same scales
            cf = next((a.path / n for a in (engine, calib) if a is not None for n in a.manifest.files
                       if n.endswith((".cache", ".calib")) and "timing" not in n), None)
            if cf is not None:
                calib_file = "model/calibration.cache"
                put(calib_file, cf)
        stripped_file = None
        if qdq and "calibration.cache" in deploy.manifest.files and "model_noqdq.onnx" in deploy.manifest.files:
            # DLA below TensorRT 11: the Q/DQ scales as a calibration cache and the graph without Q/DQ it goes with
            calib_file, stripped_file = "model/calibration.cache", "model/model_noqdq.onnx"
            put(calib_file, deploy.file("calibration.cache"))
            put(stripped_file, deploy.file("model_noqdq.onnx"))
        put("labels.txt", "\n".join(spec.classes) + "\n")
        np.save(put("reference/input.npy"), x_ref)
        np.save(put("reference/expected.npy"), expected)
        np.save(put("reference/labels.npy"), sub.y.astype(np.int64))
        from PIL import Image

        images = []
        for j, (img, lab) in enumerate(zip(sub.x, sub.y)):
            rel = f"reference/images/{j:03d}_{_safe(spec.classes[int(lab)])}.png"
            arr = img[..., 0] if img.shape[-1] == 1 else img
            Image.fromarray(np.ascontiguousarray(arr)).save(put(rel))  # uint8 HxW -> L, HxWx3 -> RGB; PNG is lossless
            images.append(rel)
        for f in _report_files(run_dir):
            put(f"report/{f.relative_to(run_dir).as_posix()}", f)

        # Triton: ONNX Runtime serves the ONNX; a TensorRT target serves the plan (built on the device if not here)
        platform = "tensorrt_plan" if profile.is_tensorrt else "onnxruntime_onnx"
        gpu = profile.is_tensorrt or any("CUDA" in p or "Tensorrt" in p for p in profile.onnxruntime.execution_providers)
        put(f"triton/{model_name}/config.pbtxt", _triton_config(model_name, platform, inputs, outputs, profile.batch.model_dump(),
                                                               profile.static_input_shape is not None, gpu))
        put(f"triton/{model_name}/labels.txt", "\n".join(spec.classes) + "\n")
        if platform == "onnxruntime_onnx":
            put(f"triton/{model_name}/1/model.onnx", onnx_src)
        elif engine is not None:
            put(f"triton/{model_name}/1/model.plan", engine.first_file((".plan", ".engine")))

        # what needs the device
        cmds: dict[str, Any] = {}
        device_build: dict[str, Any] | None = None
        needs: list[str] = []
        if profile.is_tensorrt:
            cmds = on_device_commands(onnx_src, profile, inputs[0], calib_data=cfg.data.source, calib_cache=calib_file,
                                      stripped_onnx=stripped_file)
            device_build = cmds.pop("_build")
            if "check.json" in deploy.manifest.files:  # the static TensorRT check the optimize stage ran
                put("model/check.json", deploy.file("check.json"))
            if engine is None:
                needs = ["the TensorRT engine (model/model.plan): engines are tied to the GPU and TensorRT version",
                         f"latency on the target ({profile.device}, TensorRT): not measured; the latency figures here are "
                         f"{summary.get('latency_runtime', 'ONNX Runtime CPU')} and only a proxy",
                         "accuracy of the engine: the accuracy here is the ONNX model on ONNX Runtime CPU (a proxy)"]
                put("build_on_device.sh", _build_script(profile, cmds))
                os.chmod(tmp / "build_on_device.sh", 0o755)
        if needs:
            statement = ("Built off the device: these figures need the target device and are NOT in this bundle: "
                         + "; ".join(needs) + ". Run build_on_device.sh on the device to build and time the engine, then "
                         "python3 deploy/device_report.py . [--data ...] to write device_report.json (verify checks it).")
        else:
            statement = ("Nothing needs another device: the model, latency and accuracy were built and measured on the "
                         f"machine recorded under measured_on ({_device_name(env_measured)}).")
        for s in DEPLOY_SCRIPTS:
            if (DEPLOY_DIR / s).is_file():
                put(f"deploy/{s}", DEPLOY_DIR / s)

        st = summary.get("student", {})
        lat_runtime = summary.get("latency_runtime", "onnxruntime-cpu")
        manifest: dict[str, Any] = {
            "schema": f"{BUNDLE_SCHEMA}/{BUNDLE_SCHEMA_VERSION}",
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "name": model_name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "kdtoolkit_version": _kdt_version(),
            "profile": {"name": profile.name, "backend": profile.backend, "device": profile.device, "precision": profile.precision,
                        "batch": profile.batch.model_dump(), "static_input_shape": profile.static_input_shape,
                        "power_mode": profile.power_mode,
                        "tensorrt": profile.tensorrt.model_dump() if profile.tensorrt else None,
                        "onnxruntime": profile.onnxruntime.model_dump()},
            "runtime": {"name": runtime, "onnx": "model/model.onnx", "engine": "model/model.plan" if engine is not None else None,
                        "execution_providers": list(profile.onnxruntime.execution_providers)},
            "model": {"format": "onnx", "file": "model/model.onnx", "opset": deploy.info.get("opset"), "precision": precision,
                      "precision_by_layer_group": layer_precision(onnx_src), "qdq": qdq,
                      "ort_optimization": deploy.info.get("ort_optimization")},
            "inputs": inputs,
            "outputs": outputs,
            "preprocessing": {"input_size": list(spec.input_size), "channels": spec.channels,
                              "color": "L" if spec.channels == 1 else "RGB", "resize": "bilinear", "scale": 1 / 255,
                              "mean": list(spec.mean), "std": list(spec.std), "layout": spec.layout, "dtype": "float32",
                              "formula": "x = (pixel / 255 - mean[c]) / std[c], HWC -> CHW, batch first"},
            "postprocessing": {"output": outputs[0]["name"], "kind": "logits", "scores": "softmax", "labels_file": "labels.txt"},
            "classes": list(spec.classes),
            "metrics": {
                "accuracy": {"value": st.get("accuracy"), "runtime": deploy.metrics.get("accuracy_runtime", "onnxruntime"),
                             "n_test": _n_test(run_dir),
                             "teacher": summary.get("teacher", {}).get("accuracy"),
                             "accuracy_drop_points": summary.get("accuracy_drop_points")},
                "latency_ms": {"runtime": lat_runtime, "measured": True,
                               "by_batch": st.get("latency_by_batch", {}),
                               "teacher_by_batch": summary.get("teacher", {}).get("latency_by_batch", {}),
                               "speedup": summary.get("speedup", {})},
                "target_latency_ms": None if (profile.is_tensorrt and engine is None) else st.get("latency_by_batch", {}),
                "size_bytes": st.get("size_bytes"), "params": st.get("params"), "macs": st.get("macs"),
            },
            "built_on": _env_summary(env_built),
            "measured_on": _env_summary(env_measured),
            "on_device": {"required": bool(needs), "needs_device": needs, "statement": statement, "commands": cmds,
                          "build_script": "build_on_device.sh" if (tmp / "build_on_device.sh").exists() else None,
                          **({"build": device_build} if device_build else {})},
            "reference": {"input": "reference/input.npy", "expected": "reference/expected.npy", "labels": "reference/labels.npy",
                          "images": images, "runtime": "onnxruntime", "count": len(idx),
                          "tolerance": dict(TOLERANCE.get(precision, TOLERANCE["fp32"])),
                          **({"tolerance_engine": dict(TOLERANCE.get(str(engine.info.get("precision")), TOLERANCE["int8"]))}
                             if engine is not None else {}),
                          "note": "expected = kdtoolkit's own ONNX Runtime evaluation of model/model.onnx on these test images"},
            "triton": {"path": f"triton/{model_name}", "platform": platform,
                       "needs_engine_from_device": platform == "tensorrt_plan" and engine is None},
            "lineage": lineage(deploy, run_dir),
            "report": sorted(p.relative_to(tmp).as_posix() for p in (tmp / "report").rglob("*") if p.is_file()) if (tmp / "report").exists() else [],
            "files": {},
        }
        put("README.md", _readme(manifest))
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"sha256": fsutil.sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=fsutil._json_default) + "\n")
        if tar:
            dest = out if out.name.endswith((".tar.gz", ".tgz")) else out.with_name(out.name + ".tar.gz")
            with fsutil.atomic_path(dest, suffix=".tar.gz") as t:
                with tarfile.open(t, "w:gz") as tf:
                    tf.add(tmp, arcname=dest.name.removesuffix(".tar.gz").removesuffix(".tgz"))
            return dest
        fsutil.replace_dir(tmp, out)
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)[:40]


def _kdt_version() -> str:
    from kdtoolkit import __version__

    return __version__


def _n_test(run_dir: Path) -> int | None:
    for a in _stage_artifacts(run_dir):
        if a.manifest.stage == "teacher" and "n_test" in a.metrics:
            return a.metrics["n_test"]
    return None


def _teacher_arch(deploy: Any, run_dir: Path) -> str | None:
    for a in _stage_artifacts(run_dir):
        if a.manifest.stage == "teacher":
            return a.info.get("arch") or (a.info.get("recipe") or {}).get("arch")
    return None


def _device_name(env: dict[str, Any]) -> str:
    if not env:
        return "unknown"
    if env.get("jetson"):
        return f"Jetson ({env['jetson'].get('l4t')})"
    return env.get("gpu") or (env.get("cpu") or {}).get("model") or "unknown"


def _env_summary(env: dict[str, Any]) -> dict[str, Any]:
    cpu = env.get("cpu") or {}
    return {"device": _device_name(env), "cpu": cpu.get("model"), "arch": cpu.get("arch"), "vnni": cpu.get("vnni"),
            "gpu": env.get("gpu"), "jetson": env.get("jetson"), "tensorrt": env.get("tensorrt"),
            "onnxruntime": env.get("onnxruntime"), "cuda": env.get("cuda"), "torch": env.get("torch"), "onnx": env.get("onnx"),
            "python": env.get("python"), "platform": env.get("platform")}


# ----------------------------------------------------------------------------- verify


def open_bundle(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    """A bundle folder as is, or a .tar.gz unpacked into a temp folder (the caller removes it)."""
    p = Path(path)
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
        tmp = Path(tempfile.mkdtemp(prefix="kdt-bundle-"))
        fsutil.extract_tar(p, tmp, "bundle")
        subs = [d for d in tmp.iterdir() if d.is_dir()]
        root = subs[0] if len(subs) == 1 and not (tmp / MANIFEST).exists() else tmp
        return root, tmp
    if not p.is_dir():
        raise InputError(f"bundle not found: {p}")
    return p, None


def load_manifest(root: Path) -> dict[str, Any]:
    mp = root / MANIFEST
    if not mp.is_file():
        raise InputError(f"{root}: not a bundle (no {MANIFEST})")
    try:
        m = json.loads(mp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{mp}: unreadable manifest ({exc})") from None
    if not isinstance(m, dict) or not str(m.get("schema", "")).startswith(BUNDLE_SCHEMA + "/"):
        raise InputError(f"{mp}: not a kdtoolkit bundle manifest (schema {m.get('schema') if isinstance(m, dict) else None!r}, "
                         f"expected {BUNDLE_SCHEMA}/{BUNDLE_SCHEMA_VERSION})")
    v = m.get("schema_version")
    if not isinstance(v, int):
        raise InputError(f"{mp}: schema_version missing or not an integer")
    if v > BUNDLE_SCHEMA_VERSION:
        raise InputError(f"{mp}: bundle schema version {v} is newer than this kdtoolkit supports "
                         f"({BUNDLE_SCHEMA_VERSION}); upgrade kdtoolkit to verify it")
    return m


def verify_bundle(path: str | os.PathLike[str], *, runtime: str | None = None, emit: Any = print) -> list[tuple[bool, str]]:
    """Re-check hashes, the manifest schema, load the model and compare the reference outputs.

    Emits one ``OK name`` / ``FAIL name: why`` line per check and returns them; raises InputError
    for an unusable bundle (exit 2) and CheckFailed when any check failed (exit 1).
    """
    root, tmp = open_bundle(path)
    try:
        m = load_manifest(root)
        results: list[tuple[bool, str]] = []

        def check(ok: bool, name: str, why: str = "") -> bool:
            line = f"{'OK  ' if ok else 'FAIL'} {name}" + (f": {why}" if why else "")
            results.append((ok, line))
            emit(line)
            return ok

        check(True, f"schema {m['schema']}")
        sch = validate_manifest(m)
        if sch is not None:
            check(not sch, "manifest matches bundle-manifest.schema.json", sch or "")
        files = m.get("files") or {}
        if not files:
            check(False, "files", "the manifest lists no files")
        for rel, entry in files.items():
            f = root / rel
            if not f.is_file():
                check(False, f"hash {rel}", "missing")
            else:
                got = fsutil.sha256_file(f)
                check(got == entry.get("sha256"), f"hash {rel}", "" if got == entry.get("sha256") else
                      f"sha256 {got[:12]}... differs from the manifest's {str(entry.get('sha256'))[:12]}... (file changed)")
        listed = set(files) | {MANIFEST}
        extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in listed)
        if extra:
            emit(f"note: files not in the manifest (not checked): {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        _check_model(root, m, runtime or (m.get("runtime") or {}).get("name") or "onnxruntime", check)
        from kdtoolkit.backends.device_report import check_device_report

        for ok, name, why in check_device_report(root, m):  # the device's own figures, when the device wrote them
            check(ok, name, why)
        failed = [line for ok, line in results if not ok]
        if failed:
            raise CheckFailed(f"bundle {path}: {len(failed)} of {len(results)} checks failed ({failed[0][5:]})")
        return results
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def validate_manifest(m: dict[str, Any]) -> str | None:
    """'' when the manifest matches the JSON schema, the first problem otherwise; None without jsonschema."""
    try:
        import jsonschema
    except ImportError:
        return None
    schema = json.loads(SCHEMA_FILE.read_text())
    errs = sorted(jsonschema.Draft202012Validator(schema).iter_errors(m), key=lambda e: list(e.absolute_path))
    if not errs:
        return ""
    e = errs[0]
    return f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:200]}"


def _check_model(root: Path, m: dict[str, Any], runtime: str, check: Any) -> None:
    import numpy as np

    ref = m.get("reference") or {}
    tol = ref.get("tolerance") or TOLERANCE["fp32"]
    try:
        x = np.load(root / ref["input"], allow_pickle=False)
        want = np.load(root / ref["expected"], allow_pickle=False)
    except (KeyError, OSError, ValueError) as exc:
        check(False, "reference batch", f"cannot read it ({exc})")
        return
    if runtime == "tensorrt":
        tol = ref.get("tolerance_engine") or tol  # the engine's precision, against expected logits from ONNX Runtime
        engine = (m.get("runtime") or {}).get("engine")
        if not engine or not (root / engine).is_file():
            check(False, "load tensorrt", "the bundle has no engine plan (build it on the device: build_on_device.sh); "
                                          "use --runtime onnxruntime to check the ONNX")
            return
        try:
            got = _run_tensorrt(root / engine, m, x)
        except MissingDependency:
            raise
        except Exception as exc:
            check(False, f"load tensorrt {engine}", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            return
        check(True, f"load tensorrt {engine}")
    else:
        onnx_rel = (m.get("runtime") or {}).get("onnx") or (m.get("model") or {}).get("file")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingDependency(f"onnxruntime is needed to run the bundle's ONNX ({exc}); pip install onnxruntime") from exc
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(root / onnx_rel), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            check(False, f"load onnxruntime {onnx_rel}", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return
        check(True, f"load onnxruntime {onnx_rel}")
        names_in = [i.name for i in sess.get_inputs()]
        names_out = [o.name for o in sess.get_outputs()]
        want_in = [i["name"] for i in m.get("inputs", [])]
        want_out = [o["name"] for o in m.get("outputs", [])]
        check(names_in == want_in and names_out == want_out, "input/output names",
              "" if names_in == want_in and names_out == want_out else f"model has {names_in} -> {names_out}, manifest says {want_in} -> {want_out}")
        got = sess.run(None, {names_in[0]: x.astype(np.float32)})[0]
    if got.shape != want.shape:
        check(False, "reference outputs", f"shape {got.shape} differs from the expected {want.shape}")
        return
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    close = bool(np.allclose(got, want, atol=tol["atol"], rtol=tol["rtol"]))
    agree = int((got.argmax(1) == want.argmax(1)).sum())
    check(close, f"reference outputs ({len(x)} images, {runtime})",
          f"max |diff| {diff:.3g} (atol {tol['atol']}, rtol {tol['rtol']}), top-1 {agree}/{len(x)} agree")
    check(agree == len(x), "reference top-1", f"{agree}/{len(x)} agree with the expected classes")


def _run_tensorrt(plan: Path, m: dict[str, Any], x: Any) -> Any:
    """Run the engine on the reference batch with the engine module's runner (named tensors, execute_async_v3)."""
    from kdtoolkit.backends.trt.lazy import load_tensorrt
    from kdtoolkit.backends.trt.runner import TrtRunner

    try:
        load_tensorrt()
    except MissingDependency as exc:
        raise MissingDependency(f"{exc} (or use --runtime onnxruntime to check the bundle's ONNX)") from None
    with TrtRunner(plan) as runner:
        return runner(x)
