"""`kdtoolkit compress` and `kdtoolkit demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import (
    Arch,
    Channels,
    Data,
    InputShape,
    JsonOut,
    KeepBlocks,
    Out,
    Quiet,
    Set,
    TrustPickle,
    config_default,
    config_option,
    config_panel,
    parse_input_flags,
    parse_keep_blocks,
)
from kdtoolkit.config import DataConfig, LossConfig, MeasureConfig, QatConfig, StudentConfig, TrainConfig


def print_summary(summary: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t, s = summary["teacher"], summary["student"]
    bs = sorted(t["latency_by_batch"], key=int)
    table = Table(title=f"kdtoolkit: {summary['profile']} ({summary['latency_runtime']})")
    for col in ["model", "top-1", "params", "size"] + [f"p50/p90 b{b} (ms)" for b in bs]:
        table.add_column(col, justify="right" if col != "model" else "left")
    deployed = "teacher, no student" if summary.get("no_student") else "student"
    for name, r in (("teacher", t), (f"{deployed} ({s.get('precision', 'fp32')})", s)):
        table.add_row(name, f"{100 * r['accuracy']:.2f} %" if r.get("accuracy") is not None else "n/a",
                      f"{r['params']:,}" if r.get("params") is not None else "-", f"{r['size_bytes'] / 1e6:.2f} MB",
                      *[f"{r['latency_by_batch'][b]['p50']:.3f} / {r['latency_by_batch'][b]['p90']:.3f}" for b in bs])
    drop = summary.get("accuracy_drop_points")
    table.add_row("speedup", f"{-drop:+.2f} pts" if drop is not None else "n/a", "", "", *[f"{summary['speedup']['b' + b]:.2f}x" for b in bs])
    Console().print(table)
    if s.get("precision_reason"):
        typer.echo(f"precision: {s.get('precision')} ({s['precision_reason']})")
    typer.echo(f"run folder: {run_dir}")
    for name, path in summary["stages"].items():
        typer.echo(f"  {name:15s} {path}")
    typer.echo(f"summary: {run_dir / 'summary.json'}\nreport:  {run_dir / 'report.md'}")


@app.command("compress")
def compress_cmd(
    model: Annotated[Optional[str], typer.Argument(help="teacher model file or artifact folder")] = None,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    data: Data = None,
    profile: Annotated[str, typer.Option("--profile", help="target profile name or YAML path")] = "ort-cpu",
    out: Annotated[Optional[Path], typer.Option("--out", help="run folder")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="rerun a saved RUN/config.yaml exactly")] = None,
    student_arch: config_option(StudentConfig, "arch", "--student-arch", optional=True) = None,
    depth: config_option(StudentConfig, "depth", note="in (0, 1]", optional=True) = None,
    width: config_option(StudentConfig, "width", note="in (0, 1]", optional=True) = None,
    keep_blocks: KeepBlocks = None,
    latency_budget: config_option(StudentConfig, "latency_budget_ms", "--latency-budget", note="ms", optional=True) = None,
    speedup: config_option(StudentConfig, "speedup", optional=True) = None,
    wait: Annotated[bool, typer.Option("--wait", help="if another run holds the run folder, wait for it instead of refusing")] = False,
    no_separable: Annotated[bool, typer.Option("--no-separable", help="keep standard convs in the student",
                                               rich_help_panel=config_panel(StudentConfig))] = False,
    no_student: Annotated[bool, typer.Option("--no-student", help="no student: export, INT8 with calibration (PTQ), check and bundle the teacher itself")] = False,
    student_init: config_option(StudentConfig, "init", "--student-init", optional=True) = None,
    epochs: config_option(TrainConfig, "epochs", note="distillation", optional=True) = None,
    max_steps: config_option(TrainConfig, "max_steps", optional=True) = None,
    time_budget: config_option(TrainConfig, "time_budget_min", "--time-budget", optional=True) = None,
    qat_steps: config_option(QatConfig, "max_steps", "--qat-steps", note="QAT, when the profile quantizes with QAT", optional=True) = None,
    batch_size: config_option(TrainConfig, "batch_size", optional=True) = None,
    lr: config_option(TrainConfig, "lr", optional=True) = None,
    augment: config_option(TrainConfig, "augment", optional=True) = None,
    augment_views: config_option(TrainConfig, "augment_views", optional=True) = None,
    loss: config_option(LossConfig, "name", "--loss", optional=True) = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="KD weight of the soft targets", rich_help_panel=config_panel(TrainConfig))] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", help="KD temperature", rich_help_panel=config_panel(TrainConfig))] = None,
    train_limit: config_option(DataConfig, "train_limit") = None,
    test_limit: config_option(DataConfig, "test_limit") = None,
    input_size: InputShape = None,
    channels: Channels = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="normalisation mean, e.g. 0.485,0.456,0.406")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="normalisation std, e.g. 0.229,0.224,0.225")] = None,
    class_names: Annotated[Optional[str], typer.Option("--class-names", help="comma-separated class order")] = None,
    on_bad_image: config_option(DataConfig, "on_bad_image") = config_default(DataConfig, "on_bad_image"),
    seed: Annotated[Optional[int], typer.Option("--seed", help="seed for splits, order and init")] = None,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the profile's, at most 17)")] = None,
    iters: config_option(MeasureConfig, "iters", optional=True) = None,
    int8_mode: Annotated[Optional[str], typer.Option("--int8-mode", help="static (QDQ, calibrated) or dynamic (ORT CPU: int8 MatMul/Gemm "
                                                     "weights, ranges at run time); sets the profile's quant.mode (default auto: dynamic for a transformer "
                                                     "on ONNX Runtime, static otherwise)")] = None,
    json_out: JsonOut = None,
    quiet: Quiet = False,
    sets: Set = None,
) -> None:
    """Teacher -> student -> distill -> export -> optimise -> profile -> report, resumable, in one run folder."""
    from pydantic import ValidationError

    from kdtoolkit import fsutil
    from kdtoolkit.cli.options import validation_line
    from kdtoolkit.config import CompressConfig, DataConfig, apply_overrides, load_config
    from kdtoolkit.errors import InputError
    from kdtoolkit.pipeline import compress

    if config is not None:
        cfg = load_config(config)
        run_dir = out or config.parent
    else:
        if model is None:
            raise InputError("compress needs MODEL (a model file or artifact folder), or --config RUN/config.yaml")
        if data is None:
            raise InputError("compress needs --data: the images to distill on, calibrate with and measure accuracy on "
                             "(ImageFolder, .tar.gz of one, .npz, or mnist-mini)")
        if out is None:
            out = Path("runs") / Path(model).stem
            typer.echo(f"run folder: {out} (choose another with --out)", err=True)
        flags = parse_input_flags(input_size, channels, mean, std, class_names)
        model, data, profile = _absolute_paths(model, data, profile)
        try:
            dc = DataConfig(source=data, input_size=flags.input_size, channels=flags.channels, mean=flags.mean, std=flags.std,
                            class_names=flags.classes, on_bad_image=on_bad_image,
                            train_limit=train_limit, test_limit=test_limit)
            cfg = CompressConfig(model=model, arch=arch, trust_pickle=trust_pickle, data=dc, profile=profile, opset=opset)
        except ValidationError as exc:
            raise InputError(validation_line(exc)) from None
        run_dir = out
    if seed is not None:
        cfg.data.seed = seed
        cfg.train.seed = seed
    st, tr = cfg.student, cfg.train
    for obj, key, val in ((st, "arch", student_arch), (st, "depth", depth), (st, "width", width), (st, "latency_budget_ms", latency_budget),
                          (st, "speedup", speedup), (st, "init", student_init), (tr, "epochs", epochs),
                          (tr, "max_steps", max_steps), (tr, "time_budget_min", time_budget), (tr, "batch_size", batch_size), (tr, "lr", lr), (tr, "augment", augment),
                          (tr, "augment_views", augment_views), (tr.loss, "name", loss),
                          (cfg.measure, "iters", iters), (cfg.qat, "max_steps", qat_steps)):
        if val is not None:
            setattr(obj, key, val)
    if keep_blocks is not None:
        st.keep_blocks = parse_keep_blocks(keep_blocks) or {}
    if no_separable:
        st.separable = False
    if no_student:
        cfg.no_student = True
    if int8_mode is not None:
        cfg.profile_overrides = {**cfg.profile_overrides, "quant.mode": int8_mode}
    if alpha is not None:
        tr.loss.alpha.start = alpha
    if temperature is not None:
        tr.loss.temperature.start = temperature
    try:
        cfg = CompressConfig.model_validate(cfg.model_dump())  # re-validate values set from flags
    except ValidationError as exc:
        raise InputError(validation_line(exc)) from None
    cfg = apply_overrides(cfg, sets)  # --set train.lr=0.01 ...
    summary = compress(cfg, run_dir, progress=not quiet, wait=wait)
    if json_out:
        fsutil.write_json(json_out, summary)
    print_summary(summary, run_dir)


def _absolute_paths(model: str, data: str, profile: str) -> tuple[str, str, str]:
    """RUN/config.yaml reruns from any folder, so local paths are recorded absolute. Names stay names: a built-in
    dataset (mnist-mini) or profile (jetson-orin) is never swapped for a local folder of that name, and symlinks are
    kept (a cache's model.safetensors -> blobs/<sha> has no suffix to load it by)."""
    import os

    from kdtoolkit.data.datasets import BUILTIN

    def absolute(p: str) -> str:
        q = os.path.expanduser(p)
        return os.path.abspath(q) if os.path.exists(q) else p

    profile_is_path = profile.endswith((".yaml", ".yml")) or os.sep in profile  # as targets.load_profile reads it
    return absolute(model), data if data in BUILTIN else absolute(data), absolute(profile) if profile_is_path else profile


@app.command("demo")
def demo_cmd(out: Out = Path("runs/demo"), quiet: Quiet = False,
             epochs: Annotated[int, typer.Option("--epochs", help="distillation epochs")] = 3) -> None:
    """The whole chain offline on the built-in MNIST subset: train a teacher, then compress it (a few minutes)."""
    from kdtoolkit.demo import run_demo

    summary = run_demo(out, progress=not quiet, epochs=epochs)
    print_summary(summary, out / "compress")
