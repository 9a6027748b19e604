"""Profile several models interleaved in one process and write/read the profile JSON.

The JSON keeps the raw samples (so a later ``gate`` can run a rank test on them), the settings
and the environment (so a gate can refuse to compare numbers from another device).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError

SCHEMA = "kdtoolkit.profile/1"
_THREAD_VARS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def passive_omp() -> None:
    """Idle OpenMP threads (torch's pool) must sleep, not spin, while another runner works: measured here, an
    eager torch model read 0.86 ms at p50 with OMP_WAIT_POLICY=PASSIVE and 368 ms without it when interleaved
    with an ONNX Runtime session (the same lesson as ORT's allow_spinning). It only takes effect before torch
    loads OpenMP, so it is set when torch is not imported yet, and never overrides a user's setting."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def jetson_clocks() -> dict[str, Any] | None:
    """CPU/GPU/EMC clocks on a Jetson (sysfs, readable without root); None elsewhere."""
    if not Path("/etc/nv_tegra_release").exists():
        return None
    out: dict[str, Any] = {"cpu0_cur_khz": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"),
                           "cpu0_max_khz": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq")}
    for dev in sorted(Path("/sys/class/devfreq").glob("*")):
        if "gpu" in dev.name or "gv11b" in dev.name or "ga10b" in dev.name:
            out["gpu_cur_hz"] = _read(str(dev / "cur_freq"))
            out["gpu_max_hz"] = _read(str(dev / "max_freq"))
    out["emc_hz"] = _read("/sys/kernel/debug/bpmp/debug/clk/emc/rate")
    return out


def profile_environment(runners: list[Any] | None = None) -> dict[str, Any]:
    """The manifest environment plus what decides timings: thread settings, providers, clocks, load."""
    from kdtoolkit.envinfo import environment

    need_torch = any(getattr(r, "kind", "") == "torch" for r in runners or []) or "torch" in sys.modules
    env = environment(with_torch=need_torch)
    env["threads"] = {v: os.environ.get(v) for v in _THREAD_VARS if os.environ.get(v) is not None}
    with contextlib.suppress(OSError):
        env["affinity_cores"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, AttributeError):
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if env.get("jetson") is not None:
        env["jetson"] = {**env["jetson"], "clocks": jetson_clocks()}
    return env


def profile_models(
    specs: list[str],
    *,
    batches: list[int],
    iters: int = 200,
    time_budget_s: float | None = None,
    warmup: int = 10,
    threads: int = 0,
    providers: list[str] | None = None,
    compile: bool = False,
    arch: str | None = None,
    trust_pickle: bool = False,
    input_shape: tuple[int, ...] | None = None,
    names: list[str] | None = None,
    seed: int = 0,
    command: str | None = None,
) -> dict[str, Any]:
    """Load every model, time them interleaved and return the profile document (raw samples kept)."""
    from kdtoolkit.backends.factory import load_runner
    from kdtoolkit.latency.timing import measure

    if not specs:
        raise InputError("profile needs at least one model")
    passive_omp()
    labels = names or unique_names(specs)
    runners = []
    try:
        for spec, label in zip(specs, labels):
            runners.append(load_runner(spec, name=label, threads=threads, providers=providers, compile=compile, arch=arch,
                                       trust_pickle=trust_pickle, input_shape=input_shape))
        res = measure(runners, list(batches), warmup=warmup, iters=iters, time_budget_s=time_budget_s, seed=seed)
        settings = {"batches": list(batches), "iters": iters if time_budget_s is None else None, "time_budget_s": time_budget_s,
                    "warmup": warmup, "threads": threads, "providers": providers or ["CPUExecutionProvider"],
                    "interleaved": True, "seed": seed, "compile": compile}
        doc = build_document(runners, [str(s) for s in specs], res, settings, command=command)
    finally:
        for r in runners:
            r.close()
    return doc


def build_document(runners: list[Any], sources: list[str], res: dict[str, Any], settings: dict[str, Any], *,
                   command: str | None = None) -> dict[str, Any]:
    """The profile JSON: settings, environment, what each model is (runner, source, accuracy if known), raw samples."""
    from kdtoolkit.backends.base import peak_rss_bytes

    models = {}
    for r, src in zip(runners, sources):
        info = {"source": src, **(r.describe() if hasattr(r, "describe") else {"runner": r.kind})}
        acc = artifact_accuracy(src)
        if acc is not None:
            info["accuracy"] = acc
        models[r.name] = info
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": settings,
        "environment": profile_environment(runners),
        "models": models,
        "results": {name: {str(b): s for b, s in per.items()} for name, per in res.items()},
        "process_peak_rss_bytes": peak_rss_bytes(),
    }


def artifact_accuracy(spec: str | os.PathLike[str]) -> float | None:
    """Top-1 (fraction) recorded in an artifact's manifest, following one parent if the artifact has none."""
    from kdtoolkit.bundle.common import bundle_manifest, unpacked_bundle

    p = unpacked_bundle(spec) or Path(spec)
    if p.is_file() and (p.parent / "manifest.json").is_file():
        p = p.parent
    if not (p / "manifest.json").is_file():
        return None
    try:
        man = json.loads((p / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    acc = (man.get("metrics") or {}).get("accuracy")
    if bundle_manifest(p) is not None and isinstance(acc, dict):  # a bundle records {"value": top-1, "runtime": ...}
        acc = acc.get("value")
    return float(acc) if isinstance(acc, (int, float)) else None


def unique_names(specs: list[str]) -> list[str]:
    """Short labels for models: file stem or folder name, made unique with a suffix."""
    out: list[str] = []
    for s in specs:
        p = Path(s)
        base = p.name if p.is_dir() else p.stem
        if base in ("model", "") and p.parent.name:
            base = p.parent.name
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def load_profile_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a profile JSON (ours, or a compress run's NN-profile artifact); InputError otherwise."""
    p = Path(path)
    if p.is_dir():  # a profile artifact folder
        if (p / "profile.json").is_file():
            p = p / "profile.json"
        else:
            raise InputError(f"{path}: folder holds no profile.json")
    try:
        text = p.read_text()
    except OSError as exc:
        raise InputError(f"{p}: cannot read profile JSON ({exc.strerror or exc})") from None
    if not text.strip():
        raise InputError(f"{p}: profile JSON is empty")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: not valid JSON (truncated or damaged? {exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{p}: expected a JSON object with schema {SCHEMA!r}, got {type(doc).__name__}")
    schema = doc.get("schema")
    if schema is not None and schema != SCHEMA:
        raise InputError(f"{p}: unsupported profile schema {schema!r}; expected {SCHEMA!r}")
    if not isinstance(doc.get("results"), dict) or not doc["results"] or not isinstance(doc.get("environment"), dict):
        raise InputError(f"{p}: not a kdtoolkit profile JSON (expected 'results' per model and 'environment')")
    for name, per in doc["results"].items():
        if not isinstance(per, dict) or not per:
            raise InputError(f"{p}: results for {name!r} hold no batch sizes")
        for b, s in per.items():
            samples = s.get("samples_ms") if isinstance(s, dict) else None
            if not isinstance(samples, list) or len(samples) < 5 or not all(isinstance(v, (int, float)) for v in samples):
                raise InputError(f"{p}: results[{name!r}][{b!r}] needs raw 'samples_ms' (>= 5 numbers) for a statistical test")
    doc.setdefault("schema", SCHEMA)
    doc.setdefault("settings", {})
    doc.setdefault("models", {})
    doc["results"] = {n: {str(b): s for b, s in per.items()} for n, per in doc["results"].items()}
    doc["_path"] = str(p)
    return doc


def write_profile_json(path: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    from kdtoolkit import fsutil

    return fsutil.write_json(path, {k: v for k, v in doc.items() if not k.startswith("_")})
