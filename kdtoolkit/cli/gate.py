"""`kdtoolkit gate`: fail CI on a real latency or accuracy regression, never on noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import JsonOut
from kdtoolkit.cli.profile import Batches, Budget


@app.command("gate")
def gate_cmd(
    candidate: Annotated[str, typer.Argument(help="candidate: model file, artifact folder, bundle (folder or .tar.gz), stored profile JSON[:NAME], or a device report (device_report.json or its bundle)")],
    baseline: Annotated[str, typer.Option("--baseline", help="baseline: model file, artifact folder, bundle (folder or .tar.gz), stored profile JSON[:NAME], or a device report (device_report.json or its bundle)")],
    max_slowdown: Annotated[Optional[str], typer.Option("--max-slowdown", help="allowed slowdown of the median, percent (default 5% in-job, 30% with stored JSON)")] = None,
    max_accuracy_drop: Annotated[float, typer.Option("--max-accuracy-drop", help="allowed top-1 drop, percentage points (checked when both record accuracy)")] = 0.5,
    alpha: Annotated[float, typer.Option("--alpha", help="significance level of the one-sided Mann-Whitney U test")] = 0.01,
    quantile: Annotated[float, typer.Option("--quantile", help="latency quantile compared (0.1 = p10: robust to a loaded machine's tail; 0.5 = median)")] = 0.1,
    batch: Batches = None,
    iters: Annotated[Optional[int], typer.Option("--iters", help="interleaved rounds per batch (default 1000)")] = None,
    time_budget: Budget = None,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed runs per model and batch")] = 20,
    threads: Annotated[int, typer.Option("--threads", help="intra-op threads (0 = all cores)")] = 0,
    allow_env_mismatch: Annotated[bool, typer.Option("--allow-env-mismatch", help="compare stored numbers from another device/settings anyway")] = False,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="write JUnit XML here")] = None,
    summary: Annotated[Optional[Path], typer.Option("--summary", help="append a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")] = None,
    json_out: JsonOut = None,
) -> None:
    """Exit 0 pass, 1 regression (slower than the limit AND significant, or accuracy dropped), 2 input error."""
    from kdtoolkit.cli.options import parse_ints
    from kdtoolkit.errors import CheckFailed, InputError
    from kdtoolkit.gate import DEFAULT_ROUNDS, GateSettings, markdown_summary, parse_percent, run_gate, write_outputs

    if iters is not None and time_budget is not None:
        raise InputError("give --iters or --time-budget, not both")
    if iters is not None and iters < 5:
        raise InputError(f"--iters must be at least 5, got {iters}")
    if not 0 < alpha < 1:
        raise InputError(f"--alpha must be in (0, 1), got {alpha}")
    if not 0 < quantile < 1:
        raise InputError(f"--quantile must be in (0, 1), got {quantile}")
    if max_accuracy_drop < 0:
        raise InputError(f"--max-accuracy-drop must be >= 0 points, got {max_accuracy_drop}")
    bs = parse_ints(batch, "--batch")
    s = GateSettings(max_slowdown=parse_percent(max_slowdown), max_accuracy_drop=max_accuracy_drop, alpha=alpha, quantile=quantile,
                     batches=list(bs) if bs else None, iters=iters or DEFAULT_ROUNDS, time_budget_s=time_budget,
                     warmup=warmup, threads=threads, allow_env_mismatch=allow_env_mismatch)
    result = run_gate(candidate, baseline, s)
    write_outputs(result, junit=junit, summary=summary, json_out=json_out)
    typer.echo(markdown_summary(result).rstrip())
    if result.verdict != "pass":
        raise CheckFailed("regression: " + "; ".join(f"{c['check']}: {c['message']}" for c in result.failed))
