"""`kdtoolkit profile`: time several models interleaved in one process; print a table, keep raw samples."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import Arch, JsonOut, TrustPickle, parse_ints

Batches = Annotated[Optional[str], typer.Option("--batch", help="comma-separated batch sizes, e.g. 1,8,64 (default: the profile's opt batch)")]
Iters = Annotated[Optional[int], typer.Option("--iters", help="timed interleaved rounds per batch size (default 200)")]
Budget = Annotated[Optional[float], typer.Option("--time-budget", help="seconds of timing per batch size instead of a round count")]


def resolve_timing(profile: str | None, batch: str | None, iters: int | None, time_budget: float | None,
                   threads: int | None) -> tuple[list[int], int, float | None, int, list[str] | None]:
    """Batches, rounds, budget, threads and providers from flags, falling back to the target profile."""
    from kdtoolkit.errors import InputError

    prof = None
    if profile:
        from kdtoolkit.targets import load_profile

        prof = load_profile(profile)
    batches = list(parse_ints(batch, "--batch") or ([prof.batch.opt] if prof else [1]))
    if iters is not None and time_budget is not None:
        raise InputError("give --iters or --time-budget, not both")
    if iters is not None and iters < 5:
        raise InputError(f"--iters must be at least 5, got {iters}")
    if time_budget is not None and time_budget <= 0:
        raise InputError(f"--time-budget must be positive seconds, got {time_budget}")
    if prof is not None:
        bad = [b for b in batches if not prof.batch.min <= b <= prof.batch.max]
        if bad:
            raise InputError(f"batch {bad} is outside profile {prof.name}'s range {prof.batch.min}-{prof.batch.max}")
    th = threads if threads is not None else (prof.onnxruntime.intra_op_threads if prof else 0)
    providers = list(prof.onnxruntime.execution_providers) if prof else None
    return batches, iters or 200, time_budget, th, providers


def print_profile(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(doc["results"])
    first = names[0]
    table = Table(title=f"kdtoolkit profile ({'interleaved, ' if len(names) > 1 else ''}{doc['environment'].get('cpu', {}).get('model', '?')})")
    for col in ("model", "batch", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "items/s", "mem MB", f"p50 / {first}"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in names:
        for b, s in doc["results"][name].items():
            ref = doc["results"][first][b]["p50"]
            mem = s.get("mem_bytes")
            table.add_row(name, b, str(s["n"]), f"{s['p50']:.3f}", f"{s['p90']:.3f}", f"{s['p99']:.3f}", f"{s['mean']:.3f}",
                          f"{s['std']:.3f}", f"{s['throughput_per_s']:.1f}", "?" if mem is None else f"{mem / 1e6:.1f}",
                          f"{s['p50'] / ref:.3f}x")
    console = Console()
    Console(width=max(console.width, 150)).print(table)
    for name, m in doc["models"].items():
        how = m.get("runner", "?")
        if how == "onnxruntime":
            how += f" ({', '.join(m.get('providers') or [])}, intra-op threads {m.get('intra_op_threads') or 'all cores'}, spinning off)"
        elif how == "torch":
            how += f" ({'torch.compile' if m.get('compiled') else 'eager'}, {m.get('torch_threads')} threads)"
            if m.get("compile_error"):
                how += f"; torch.compile failed, ran eager: {m['compile_error']}"
        typer.echo(f"{name}: {how}")
    typer.echo("mem = RSS growth from loading + warm-up (models share one process: an upper bound)")


@app.command("profile")
def profile_cmd(
    models: Annotated[list[str], typer.Argument(help="ONNX files, engines, torch checkpoints, artifact folders or bundles (measured interleaved)")],
    profile: Annotated[Optional[str], typer.Option("--profile", help="target profile: default batch, threads, execution providers")] = None,
    batch: Batches = None,
    iters: Iters = None,
    time_budget: Budget = None,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed runs per model and batch")] = 10,
    threads: Annotated[Optional[int], typer.Option("--threads", help="intra-op threads (0 = all cores; default: the profile's)")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch models: torch.compile (falls back to eager where it fails)")] = False,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="C,H,W for a torch file without input metadata")] = None,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = None,
) -> None:
    """Warm up, then time each model at each batch interleaved; p50/p90/p99, mean, std, throughput, memory."""
    from kdtoolkit.latency.session import profile_models, write_profile_json

    batches, n, budget, th, providers = resolve_timing(profile, batch, iters, time_budget, threads)
    doc = profile_models(models, batches=batches, iters=n, time_budget_s=budget, warmup=warmup, threads=th, providers=providers,
                         compile=compile, arch=arch, trust_pickle=trust_pickle, input_shape=parse_ints(input_shape, "--input-shape"),
                         command=" ".join(["kdtoolkit", *sys.argv[1:]]))
    if json_out:
        write_profile_json(Path(json_out), doc)
    print_profile(doc)
    if json_out:
        typer.echo(f"raw samples + environment: {json_out}")
