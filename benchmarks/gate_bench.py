"""Measure the gate's false-alarm and detection rates on THIS machine (the README quotes the figures).

- A/A in-job: the same model as baseline and candidate, ``kdtoolkit gate`` re-measuring both interleaved.
- A/A stored: a baseline profile JSON written by one ``kdtoolkit profile`` process, the candidate
  (the same model) measured by ``kdtoolkit gate`` in another process, at the default stored threshold.
- A/B in-job: a real candidate with one more residual block in stage 2 of a CIFAR ResNet-20 (about
  10 % slower measured here), trained-like BatchNorm statistics, not synthesised samples.
- Repeatability: the interleaved p50 ratio of the two models in 5 separate ``kdtoolkit profile`` processes.

Every repetition is a real CLI process. Resumable: results go to benchmarks/results/gate.json
(atomically) after each repetition, and finished repetitions are skipped on a rerun.

    python benchmarks/gate_bench.py [--reps 20] [--work /tmp/kdt_gate_bench] [--fresh]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "gate.json"


def make_models(work: Path) -> dict[str, str]:
    """ResNet-20 (A, and a byte-identical copy A2) and ResNet-20 with one more stage-2 block (B)."""
    import torch
    from torch import nn

    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.zoo import BasicBlock, CifarResNet, ShortcutA

    class _Plain(ShortcutA):  # the torchscript exporter cannot trace ShortcutA's dict _extra_state
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

    def realistic(m: nn.Module) -> nn.Module:
        # kaiming init, then BatchNorm statistics from a few batches (trained-like activations, no denormals)
        torch.manual_seed(1)
        m.train()
        with torch.no_grad():
            for _ in range(5):
                m(torch.randn(64, 3, 32, 32))
        for mod in m.modules():
            if isinstance(mod, ShortcutA):
                mod.__class__ = _Plain
        return m.eval()

    paths = {k: work / f"{k}.onnx" for k in ("A", "A2", "B")}
    if not all(p.exists() for p in paths.values()):
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        export_onnx(realistic(CifarResNet(20)), (1, 3, 32, 32), paths["A"])
        shutil.copyfile(paths["A"], paths["A2"])
        torch.manual_seed(0)
        b = CifarResNet(20)
        b.layer2.append(BasicBlock(32, 32, 1))
        export_onnx(realistic(b), (1, 3, 32, 32), paths["B"])
    return {k: str(v) for k, v in paths.items()}


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kdtoolkit", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def gate_rep(cand: str, base: str, out: Path) -> dict:
    t0 = time.time()
    r = cli("gate", cand, "--baseline", base, "--json", str(out))
    rec = {"rc": r.returncode, "wall_s": round(time.time() - t0, 1)}
    if r.returncode in (0, 1) and out.exists():
        g = json.loads(out.read_text())
        c = next(c for c in g["checks"] if c["kind"] == "latency")
        rec.update({"ratio": round(c["ratio"], 4), "ratio_p50": round(c["ratio_p50"], 4), "p_slower": c["p_slower"],
                    "threshold": c["threshold"], "quantile": c["quantile"], "n": c["n_baseline"],
                    "baseline_q": round(c["baseline_q"], 4), "candidate_q": round(c["candidate_q"], 4), "mode": g["mode"]})
    else:
        rec["stderr"] = r.stderr.strip()[-300:]
    return rec


def stored_rep(model: str, work: Path, i: int) -> dict:
    base = work / f"stored_base_{i}.json"
    t0 = time.time()
    p = cli("profile", model, "--batch", "1", "--iters", "1000", "--json", str(base))
    if p.returncode != 0:
        return {"rc": p.returncode, "stderr": p.stderr.strip()[-300:]}
    rec = gate_rep(model, str(base), work / f"stored_gate_{i}.json")
    rec["wall_s"] = round(time.time() - t0, 1)
    return rec


def repeat_rep(a: str, b: str, work: Path, i: int) -> dict:
    out = work / f"repeat_{i}.json"
    r = cli("profile", a, b, "--batch", "1", "--iters", "1000", "--json", str(out))
    if r.returncode != 0:
        return {"rc": r.returncode, "stderr": r.stderr.strip()[-300:]}
    res = json.loads(out.read_text())["results"]
    na, nb = list(res)
    from kdtoolkit.gate import DEFAULT_QUANTILE
    from kdtoolkit.latency.stats import compare

    c = compare(res[na]["1"]["samples_ms"], res[nb]["1"]["samples_ms"], quantile=DEFAULT_QUANTILE)
    return {"rc": 0, "ratio": round(c["ratio"], 4), "ratio_p50": round(c["ratio_p50"], 4),
            "a_q": round(c["baseline_q"], 4), "b_q": round(c["candidate_q"], 4)}


def save(doc: dict) -> None:
    from kdtoolkit import fsutil

    fsutil.write_json(RESULTS, doc)


def summarise(doc: dict) -> dict:
    ph = doc["phases"]

    def reps(name: str) -> list[dict]:
        return [r for r in ph.get(name, {}).values() if r.get("rc") in (0, 1)]

    aa, ab, st, rp = reps("aa_in_job"), reps("ab_in_job"), reps("aa_stored"), [r for r in ph.get("repeatability", {}).values() if r.get("rc") == 0]
    out = {
        "aa_in_job": {"reps": len(aa), "false_alarms": sum(r["rc"] == 1 for r in aa),
                      "ratio_min": min((r["ratio"] for r in aa), default=None), "ratio_max": max((r["ratio"] for r in aa), default=None)},
        "aa_stored": {"reps": len(st), "false_alarms": sum(r["rc"] == 1 for r in st),
                      "ratio_min": min((r["ratio"] for r in st), default=None), "ratio_max": max((r["ratio"] for r in st), default=None)},
        "ab_in_job": {"reps": len(ab), "detected": sum(r["rc"] == 1 for r in ab),
                      "ratio_median": sorted(r["ratio"] for r in ab)[len(ab) // 2] if ab else None,
                      "ratio_min": min((r["ratio"] for r in ab), default=None), "ratio_max": max((r["ratio"] for r in ab), default=None)},
    }
    if rp:
        ratios = [r["ratio"] for r in rp]
        mean = sum(ratios) / len(ratios)
        p50 = [r["ratio_p50"] for r in rp]
        out["repeatability"] = {"runs": len(rp), "statistic": "ratio of p10 (the gate's statistic)", "ratios": ratios,
                                "spread_pct": round(100 * (max(ratios) - min(ratios)) / mean, 2),
                                "ratios_p50": p50, "spread_p50_pct": round(100 * (max(p50) - min(p50)) / (sum(p50) / len(p50)), 2)}
    errors = sum(r.get("rc") not in (0, 1) for p in ph.values() for r in p.values())
    out["errors"] = errors
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--repeat-runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdt_gate_bench"))
    ap.add_argument("--fresh", action="store_true", help="discard earlier results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from kdtoolkit.envinfo import cpu_info

    doc = {} if args.fresh or not RESULTS.exists() else json.loads(RESULTS.read_text())
    cpu = cpu_info()
    doc.setdefault("machine", {"cpu": cpu["model"], "logical_cores": cpu["logical_cores"], "flags": cpu["flags"]})
    doc["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    doc.setdefault("started", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    doc["models"] = {"A": "cifar_resnet20 (kaiming init + BN statistics from 5 batches), ONNX opset 17",
                     "B": "A with one more BasicBlock in stage 2 (32 channels, 16x16)"}
    doc["gate_defaults"] = ("kdtoolkit gate defaults: batch 1, 1000 interleaved rounds, 20 warm-up, p10 latency ratio, "
                            "one-sided Mann-Whitney U alpha 0.01, limit 5 % in-job / 30 % stored; ORT CPU, all cores, spinning off")
    doc.setdefault("phases", {})
    m = make_models(args.work)
    plan = [("aa_in_job", args.reps, lambda i: gate_rep(m["A2"], m["A"], args.work / f"aa_{i}.json")),
            ("ab_in_job", args.reps, lambda i: gate_rep(m["B"], m["A"], args.work / f"ab_{i}.json")),
            ("aa_stored", args.reps, lambda i: stored_rep(m["A"], args.work, i)),
            ("repeatability", args.repeat_runs, lambda i: repeat_rep(m["A"], m["B"], args.work, i))]
    # interleave the phases rep by rep, so a change in background load hits all of them alike
    for i in range(max(n for _, n, _ in plan)):
        for name, n, fn in plan:
            done = doc["phases"].setdefault(name, {})
            if i >= n or done.get(str(i), {}).get("rc") in (0, 1):
                continue
            rec = fn(i)
            done[str(i)] = rec
            doc["summary"] = summarise(doc)
            doc["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            save(doc)
            print(f"{name} #{i}: {rec}", flush=True)
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
