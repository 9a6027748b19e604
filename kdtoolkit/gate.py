"""A noise-aware latency and accuracy regression gate for CI.

Two modes:

- **in-job** (both sides are models/artifacts): baseline and candidate are re-measured interleaved
  in this process, so both see the same background load. This is the reliable mode.
- **stored** (either side is a profile JSON, or a device report written on the target by a bundle's
  deploy/device_report.py): numbers from another process are compared. Measured
  on this project's machine, p50 of single-session runs spread 15 to 30 % between processes, so the
  default threshold is wider, and the environment (device, threads, runtime version) must match.

A latency regression needs both: the candidate's latency (10th percentile by default: robust to
the bimodal tails of a loaded machine, see kdtoolkit.latency.stats.compare) is slower than the threshold allows AND a
one-sided Mann-Whitney U test over the raw samples says the slowdown is real (p < alpha).
Accuracy regresses when it drops by more than the allowed percentage points (when both sides
record it). Exit codes via the CLI: 0 pass, 1 regression, 2 input error.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtoolkit.errors import InputError

DEFAULT_SLOWDOWN_IN_JOB = 0.05
DEFAULT_SLOWDOWN_STORED = 0.30
DEFAULT_ALPHA = 0.01
DEFAULT_ROUNDS = 1000  # interleaved rounds per batch (ResNet-20 at batch 1: a few seconds); 500 missed 1 of 5 A/B reps here
DEFAULT_QUANTILE = 0.10  # the latency quantile compared; see kdtoolkit.latency.stats.compare for why not the median


@dataclass
class GateSettings:
    max_slowdown: float | None = None  # fraction (0.05 = 5 %); None = mode default
    max_accuracy_drop: float | None = 0.5  # percentage points; None = not checked
    alpha: float = DEFAULT_ALPHA
    quantile: float = DEFAULT_QUANTILE
    batches: list[int] | None = None  # None = [1] in-job, or every batch both stored sides have
    iters: int = DEFAULT_ROUNDS
    time_budget_s: float | None = None
    warmup: int = 20
    threads: int = 0
    providers: list[str] | None = None
    allow_env_mismatch: bool = False
    seed: int = 0


@dataclass
class Side:
    spec: str
    role: str  # "baseline" or "candidate"
    stored: dict[str, Any] | None = None  # the profile JSON, when this side is stored numbers
    name: str | None = None  # model name inside the stored JSON

    @property
    def is_stored(self) -> bool:
        return self.stored is not None


@dataclass
class GateResult:
    verdict: str  # "pass" or "regression"
    mode: str
    checks: list[dict[str, Any]]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["status"] == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "kdtoolkit.gate/1", "verdict": self.verdict, "mode": self.mode, "settings": self.settings,
                "checks": self.checks, "notes": self.notes, "environment": self.environment, "profiles": self.profiles}


def parse_percent(text: str | float | None, what: str = "--max-slowdown") -> float | None:
    """'5%' or '5' -> 0.05 (a fraction). Percent either way, so '0.5' means half a percent."""
    if text is None:
        return None
    s = str(text).strip().rstrip("%").strip()
    try:
        v = float(s)
    except ValueError:
        raise InputError(f"{what} must be a percentage like 5% or 12.5, got {text!r}") from None
    if not 0 <= v < 1000:
        raise InputError(f"{what} must be between 0% and 1000%, got {text!r}")
    return v / 100.0


def resolve_side(spec: str, role: str) -> Side:
    """A model/artifact to measure, or stored numbers: FILE.json[:NAME], a profile artifact folder[:NAME], or a
    device report (device_report.json, or a bundle folder holding one) measured on the target by the bundle's script."""
    from kdtoolkit.backends.device_report import device_report_as_profile, is_device_report, load_device_report
    from kdtoolkit.bundle.common import unpacked_bundle

    unpacked = unpacked_bundle(spec)  # a bundle archive: read as the folder it unpacks to
    if unpacked is not None and is_device_report(unpacked):
        doc = device_report_as_profile(load_device_report(unpacked), path=spec)
        return Side(spec, role, stored=doc, name="device")
    if is_device_report(spec):
        doc = device_report_as_profile(load_device_report(spec), path=spec)
        return Side(spec, role, stored=doc, name="device")
    path, name = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and tail and (head.endswith(".json") or (Path(head) / "profile.json").is_file()):
        path, name = head, tail
    p = Path(path)
    stored_like = p.suffix.lower() == ".json" or (p.is_dir() and (p / "profile.json").is_file())
    if not stored_like:
        if not p.exists():
            raise InputError(f"{role} not found: {spec}")
        return Side(spec, role)
    from kdtoolkit.latency.session import load_profile_json

    doc = load_profile_json(p)
    names = list(doc["results"])
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif role in names:
            name = role
        else:
            raise InputError(f"{spec}: holds several models ({', '.join(names)}); pick one with {path}:NAME")
    elif name not in names:
        raise InputError(f"{spec}: no model {name!r} in it (has: {', '.join(names)})")
    return Side(spec, role, stored=doc, name=name)


# --- environment check for stored numbers ---------------------------------------------------------

def _device(env: dict[str, Any]) -> dict[str, Any]:
    cpu = env.get("cpu") or {}
    jet = env.get("jetson") or {}
    return {"cpu model": cpu.get("model"), "cpu arch": cpu.get("arch"), "logical cores": cpu.get("logical_cores"),
            "gpu": env.get("gpu"), "jetson L4T": jet.get("l4t"), "jetson power mode": jet.get("power_mode")}


def _runtime_versions(doc: dict[str, Any], name: str) -> dict[str, Any]:
    runner = (doc.get("models", {}).get(name) or {}).get("runner", "onnxruntime")
    env = doc.get("environment", {})
    lib = {"onnxruntime": "onnxruntime", "torch": "torch", "tensorrt": "tensorrt"}.get(runner, runner)
    return {"runner": runner, f"{lib} version": env.get(lib)}


def _settings(doc: dict[str, Any], name: str) -> dict[str, Any]:
    st = doc.get("settings", {})
    m = doc.get("models", {}).get(name) or {}
    return {"threads": st.get("threads", doc.get("threads")), "providers": m.get("providers", st.get("providers")),
            "torch.compile": m.get("compiled")}


def environment_diff(a: dict[str, Any], a_name: str, b: dict[str, Any], b_name: str) -> tuple[list[str], list[str]]:
    """(device mismatches, setting/version mismatches) between two profile documents, as readable lines."""
    dev, other = [], []
    da, db = _device(a.get("environment", {})), _device(b.get("environment", {}))
    for k in da:
        if da[k] != db[k]:
            dev.append(f"{k}: baseline {db[k]!r}, candidate {da[k]!r}")
    sa, sb = {**_runtime_versions(a, a_name), **_settings(a, a_name)}, {**_runtime_versions(b, b_name), **_settings(b, b_name)}
    for k in sorted(set(sa) | set(sb)):  # a setting one side does not record (an older JSON) is not compared
        if sa.get(k) != sb.get(k) and sa.get(k) is not None and sb.get(k) is not None:
            other.append(f"{k}: baseline {sb.get(k)!r}, candidate {sa.get(k)!r}")
    return dev, other


# --- the gate ---------------------------------------------------------------------------------------

def _measure_alone(side: Side, batches: list[int], s: GateSettings, like: dict[str, Any] | None) -> dict[str, Any]:
    """Measure one model now, with the stored side's threads and providers when it has them."""
    from kdtoolkit.latency.session import profile_models

    st = (like or {}).get("settings", {})
    threads = s.threads if s.threads else int(st.get("threads") or 0)
    providers = s.providers or st.get("providers")
    return profile_models([side.spec], batches=batches, iters=s.iters, time_budget_s=s.time_budget_s, warmup=s.warmup,
                          threads=threads, providers=providers, names=[side.role], seed=s.seed)


def _stored(side: Side) -> tuple[dict[str, Any], str]:
    assert side.stored is not None and side.name is not None
    return side.stored, side.name


def run_gate(candidate: str, baseline: str, settings: GateSettings | None = None) -> GateResult:
    """Compare candidate with baseline; see the module docstring for the rules."""
    from kdtoolkit.latency.session import profile_models
    from kdtoolkit.latency.stats import compare

    s = settings or GateSettings()
    cand, base = resolve_side(candidate, "candidate"), resolve_side(baseline, "baseline")
    notes: list[str] = []
    if not cand.is_stored and not base.is_stored:
        mode = "in-job"
        batches = s.batches or [1]
        doc = profile_models([base.spec, cand.spec], batches=batches, iters=s.iters, time_budget_s=s.time_budget_s,
                             warmup=s.warmup, threads=s.threads, providers=s.providers, names=["baseline", "candidate"], seed=s.seed)
        bdoc, bname, cdoc, cname = doc, "baseline", doc, "candidate"
        notes.append("baseline and candidate re-measured interleaved in this job (random order every round)")
    else:
        mode = "stored"
        stored, stored_name = _stored(base if base.is_stored else cand)
        have = sorted(int(b) for b in stored["results"][stored_name])
        if s.batches:
            missing = [b for b in s.batches if b not in have]
            if missing:
                raise InputError(f"{base.spec if base.is_stored else cand.spec}: no samples at batch {missing} (has {have})")
        batches = s.batches or have
        if base.is_stored and cand.is_stored:
            cstored, cstored_name = _stored(cand)
            chave = sorted(int(b) for b in cstored["results"][cstored_name])
            batches = [b for b in batches if b in chave]
            if not batches:
                raise InputError(f"baseline and candidate JSON share no batch size (baseline {have}, candidate {chave})")
        bdoc, bname = _stored(base) if base.is_stored else (_measure_alone(base, batches, s, stored), "baseline")
        cdoc, cname = _stored(cand) if cand.is_stored else (_measure_alone(cand, batches, s, stored), "candidate")
        dev, other = environment_diff(cdoc, cname, bdoc, bname)
        if (dev or other) and not s.allow_env_mismatch:
            what = "another device" if dev else "different settings or runtime versions"
            raise InputError(f"stored numbers come from {what}: {'; '.join(dev + other)} "
                             "(re-measure both in this job, or pass --allow-env-mismatch)")
        for line in dev + other:
            notes.append(f"environment differs (allowed): {line}")
        notes.append("stored numbers from another process: a wider threshold applies (p50 spread 15-30 % between processes here)")
    thr = s.max_slowdown if s.max_slowdown is not None else (DEFAULT_SLOWDOWN_IN_JOB if mode == "in-job" else DEFAULT_SLOWDOWN_STORED)

    checks: list[dict[str, Any]] = []
    for b in batches:
        bs = bdoc["results"][bname][str(b)]["samples_ms"]
        cs = cdoc["results"][cname][str(b)]["samples_ms"]
        c = compare(bs, cs, quantile=s.quantile)
        slower = c["ratio"] - 1.0
        significant = c["p_slower"] < s.alpha
        fail = slower > thr and significant
        if fail:
            why = f"{100 * slower:.1f} % slower (> {100 * thr:g} %), p = {c['p_slower']:.2g} < {s.alpha:g}"
        elif slower > thr:
            why = f"{100 * slower:.1f} % slower but not significant (p = {c['p_slower']:.2g} >= {s.alpha:g})"
        else:
            why = f"{round(100 * slower, 1) + 0.0:+.1f} % (limit +{100 * thr:g} %)"
        checks.append({"check": f"latency b{b}", "kind": "latency", "batch": b, "status": "fail" if fail else "pass",
                       "slowdown": slower, "threshold": thr, "significant": significant, "message": why, **c})

    acc_b = (bdoc.get("models", {}).get(bname) or {}).get("accuracy")
    acc_c = (cdoc.get("models", {}).get(cname) or {}).get("accuracy")
    if s.max_accuracy_drop is not None:
        if acc_b is None or acc_c is None:
            checks.append({"check": "accuracy", "kind": "accuracy", "status": "skipped",
                           "message": "not checked: " + ("baseline" if acc_b is None else "candidate") + " records no accuracy",
                           "baseline": acc_b, "candidate": acc_c})
        else:
            drop = 100.0 * (acc_b - acc_c)
            fail = drop > s.max_accuracy_drop
            checks.append({"check": "accuracy", "kind": "accuracy", "status": "fail" if fail else "pass", "baseline": acc_b,
                           "candidate": acc_c, "drop_points": drop, "threshold_points": s.max_accuracy_drop,
                           "message": f"{100 * acc_b:.2f} % -> {100 * acc_c:.2f} % ({round(-drop, 2) + 0.0:+.2f} points, limit -{s.max_accuracy_drop:g})"})

    verdict = "regression" if any(c["status"] == "fail" for c in checks) else "pass"
    used = {"mode": mode, "max_slowdown": thr, "max_accuracy_drop_points": s.max_accuracy_drop, "alpha": s.alpha, "quantile": s.quantile,
            "batches": batches, "rounds": s.iters if s.time_budget_s is None else None, "time_budget_s": s.time_budget_s,
            "warmup": s.warmup, "baseline": baseline, "candidate": candidate,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    profiles = {"baseline": bdoc} if bdoc is cdoc else {"baseline": bdoc, "candidate": cdoc}
    return GateResult(verdict, mode, checks, used, notes, environment=cdoc.get("environment", {}),
                      profiles={k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in profiles.items()})


# --- outputs for CI -----------------------------------------------------------------------------------

def junit_xml(r: GateResult) -> str:
    """JUnit XML: one testcase per check; a regression is a <failure>, an unchecked accuracy is <skipped>."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name="kdtoolkit-gate", tests=str(len(r.checks)), failures=str(len(r.failed)),
                       errors="0", skipped=str(sum(c["status"] == "skipped" for c in r.checks)),
                       timestamp=r.settings.get("created", ""))
    props = ET.SubElement(suite, "properties")
    for k in ("mode", "max_slowdown", "quantile", "alpha", "baseline", "candidate"):
        ET.SubElement(props, "property", name=k, value=str(r.settings.get(k)))
    for c in r.checks:
        case = ET.SubElement(suite, "testcase", classname="kdtoolkit.gate", name=c["check"], time="0")
        if c["status"] == "fail":
            ET.SubElement(case, "failure", message=c["message"], type="regression").text = c["message"]
        elif c["status"] == "skipped":
            ET.SubElement(case, "skipped", message=c["message"])
        else:
            ET.SubElement(case, "system-out").text = c["message"]
    ET.indent(suite)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


def markdown_summary(r: GateResult) -> str:
    """GitHub step-summary Markdown: verdict, a table per check, the mode and environment."""
    icon = "✅" if r.verdict == "pass" else "❌"
    pq = f"{100 * r.settings.get('quantile', 0.5):g}"
    lines = [f"## {icon} kdtoolkit gate: {r.verdict.upper()}", "",
             f"Mode: **{r.mode}**; a regression is slower than +{100 * r.settings['max_slowdown']:g} % at the "
             f"p{pq} latency (percentile) AND significant (one-sided Mann-Whitney U, p < {r.settings['alpha']:g}).", "",
             f"| check | baseline p{pq} (ms) | candidate p{pq} (ms) | change p{pq} | change p50 | p (slower) | samples | result |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in r.checks:
        if c["kind"] != "latency":
            continue
        lines.append(f"| {c['check']} | {c['baseline_q']:.3f} | {c['candidate_q']:.3f} | {round(100 * c['slowdown'], 1) + 0.0:+.1f} % | "
                     f"{round(100 * (c['ratio_p50'] - 1), 1) + 0.0:+.1f} % | "
                     f"{c['p_slower']:.2g} | {c['n_baseline']} / {c['n_candidate']} | {'**FAIL**' if c['status'] == 'fail' else 'pass'} |")
    for c in r.checks:
        if c["kind"] == "accuracy":
            lines += ["", f"Accuracy: {c['status'].upper() if c['status'] == 'fail' else c['status']}: {c['message']}"]
    cpu = (r.environment.get("cpu") or {})
    lines += ["", f"Baseline `{r.settings['baseline']}`, candidate `{r.settings['candidate']}`; "
              f"CPU {cpu.get('model', '?')} ({cpu.get('logical_cores', '?')} logical cores), "
              f"onnxruntime {r.environment.get('onnxruntime')}, GPU {r.environment.get('gpu') or 'none'}."]
    lines += [f"- {n}" for n in r.notes]
    return "\n".join(lines) + "\n"


def write_outputs(r: GateResult, *, junit: str | os.PathLike[str] | None = None, summary: str | os.PathLike[str] | None = None,
                  json_out: str | os.PathLike[str] | None = None) -> None:
    """JUnit and JSON are written atomically; the summary is appended (GITHUB_STEP_SUMMARY is shared by a job's steps)."""
    from kdtoolkit import fsutil

    if junit:
        fsutil.write_text(junit, junit_xml(r))
    if json_out:
        fsutil.write_json(json_out, r.to_dict())
    if summary:
        Path(summary).parent.mkdir(parents=True, exist_ok=True)
        with open(summary, "a", encoding="utf-8") as fh:
            fh.write(markdown_summary(r) + "\n")
