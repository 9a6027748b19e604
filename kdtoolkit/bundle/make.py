"""`make_bundle`: write the hand-off bundle of a finished compress run, atomically."""

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
from kdtoolkit.bundle.common import (
    BUNDLE_SCHEMA,
    BUNDLE_SCHEMA_VERSION,
    DEPLOY_DIR,
    DEPLOY_SCRIPTS,
    MANIFEST,
    TOLERANCE,
    _device_name,
    _env_summary,
    _has_qdq,
    _io_from_onnx,
    _safe,
    layer_precision,
)
from kdtoolkit.bundle.lineage import _stage_artifacts, find_final, lineage
from kdtoolkit.bundle.readme import _build_script, _readme, on_device_commands
from kdtoolkit.bundle.triton import _triton_config
from kdtoolkit.errors import InputError


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

def make_bundle(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, tar: bool = False, splits: Any = None,
                data: str | None = None, samples: int = 16, name: str | None = None, test_subset: int = 0,
                on_bad_image: str | None = None) -> Path:
    """Write the bundle for a finished compress run; atomically (a temp folder or file renamed into place).

    ``test_subset`` > 0 also packs that many seeded test images (raw uint8 + labels, ``testset/test.npz``) with
    the ONNX Runtime top-1 on exactly those images, so ``deploy/device_report.py`` measures the engine's top-1
    on the device like for like when no data is at hand there."""
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
                           on_bad_image=on_bad_image or d.on_bad_image, train_limit=d.train_limit, test_limit=d.test_limit)
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
    raw = (deploy.info.get("outputs") or {}).get("kind") == "raw"  # outputs that are not class logits
    if raw and test_subset > 0:
        raise InputError("--test-subset measures top-1 on the device; the model's outputs are not class logits")
    session = make_session(onnx_src)  # one session for the reference batch and the test subset
    if raw:
        expected_all = [o.astype(np.float32) for o in predict(session, sub, spec, batch_size=batch, all_outputs=True)]
        expected = expected_all[0]
    else:
        expected = predict(session, sub, spec, batch_size=batch).astype(np.float32)

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
        if not raw:
            put("labels.txt", "\n".join(spec.classes) + "\n")
        np.save(put("reference/input.npy"), x_ref)
        np.save(put("reference/expected.npy"), expected)
        expected_outputs = None
        if raw:
            expected_outputs = {o["name"]: f"reference/expected_{i}_{_safe(o['name'])}.npy" for i, o in enumerate(outputs)}
            for rel, arr in zip(expected_outputs.values(), expected_all):
                np.save(put(rel), arr)
        np.save(put("reference/labels.npy"), sub.y.astype(np.int64))
        testset = None
        if test_subset > 0:
            n = min(test_subset, len(splits.test))
            pick = np.sort(np.random.default_rng(cfg.data.seed).permutation(len(splits.test))[:n])
            tsub = splits.test.subset(pick.astype(np.int64))
            pred = predict(session, tsub, spec, batch_size=batch).argmax(1)
            np.savez_compressed(put("testset/test.npz"), x=np.asarray(tsub.x, np.uint8), y=tsub.y.astype(np.int64))
            testset = {"path": "testset/test.npz", "images": int(n), "seed": cfg.data.seed,
                       "onnxruntime_top1": float((pred == tsub.y).mean()), "runtime": "onnxruntime-cpu",
                       "note": "raw uint8 test images (N,H,W,C) at the model's input size and their labels; "
                               "onnxruntime_top1 is model/model.onnx on exactly these images"}
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
                                                               profile.static_input_shape is not None, gpu, labels=not raw))
        if not raw:
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
            "postprocessing": ({"output": outputs[0]["name"], "kind": "raw", "outputs": [o["name"] for o in outputs], "scores": None,
                                "labels_file": None} if raw else
                               {"output": outputs[0]["name"], "kind": "logits", "scores": "softmax", "labels_file": "labels.txt"}),
            "classes": [] if raw else list(spec.classes),
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
                          **({"expected_outputs": expected_outputs} if expected_outputs else {}),
                          "images": images, "runtime": "onnxruntime", "count": len(idx),
                          "tolerance": dict(TOLERANCE.get(precision, TOLERANCE["fp32"])),
                          **({"tolerance_engine": dict(TOLERANCE.get(str(engine.info.get("precision")), TOLERANCE["int8"]))}
                             if engine is not None else {}),
                          "note": "expected = kdtoolkit's own ONNX Runtime evaluation of model/model.onnx on these test images"},
            **({"test_subset": testset} if testset else {}),
            "triton": {"path": f"triton/{model_name}", "platform": platform,
                       "needs_engine_from_device": platform == "tensorrt_plan" and engine is None},
            "lineage": lineage(deploy, run_dir),
            "report": sorted(p.relative_to(tmp).as_posix() for p in (tmp / "report").rglob("*") if p.is_file()) if (tmp / "report").exists() else [],
            "files": {},
        }
        put("README.md", _readme(manifest))
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"sha256": fsutil.sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST}
        _check_against_model(manifest)
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


def _check_against_model(manifest: dict[str, Any]) -> None:
    """The manifest about to be written must fit kdtoolkit.bundle.manifest.BundleManifest (the published schema)."""
    from pydantic import ValidationError

    from kdtoolkit.bundle.manifest import BundleManifest
    from kdtoolkit.errors import CheckFailed

    try:
        BundleManifest.model_validate(json.loads(json.dumps(manifest, default=fsutil._json_default)))
    except ValidationError as exc:
        e = exc.errors()[0]
        raise CheckFailed(f"the bundle manifest does not fit its schema at {'.'.join(map(str, e['loc']))}: {e['msg']} "
                          "(a kdtoolkit bug: please report it)") from None
