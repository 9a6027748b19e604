"""Training commands: `distill` and `finetune`, both over the one Trainer.

Both write a torch artifact (model.pt with its recipe, history, metrics.jsonl, test accuracy) that
`compress` takes as its teacher or student. Checkpoints live in a work folder beside ``--out``
named by a hash of everything that decides the run, so rerunning the same command after a kill
resumes. Under ``torchrun --nproc_per_node N -m kdtoolkit distill ...`` every process trains
(DistributedDataParallel) and only rank 0 evaluates and writes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import (
    Arch,
    BadImage,
    Channels,
    Data,
    InputShape,
    JsonOut,
    Mean,
    ModelArg,
    Out,
    Quiet,
    Set,
    Std,
    TrustPickle,
    config_default,
    config_option,
    parse_floats,
    validation_line,
)
from kdtoolkit.config import AdapterConfig, DataConfig, LossConfig, TrainConfig

Optim = config_option(TrainConfig, "optimizer", note="sgd (Nesterov momentum) or adamw")
Epochs = config_option(TrainConfig, "epochs")
MaxSteps = config_option(TrainConfig, "max_steps")
BatchSize = config_option(TrainConfig, "batch_size")
Lr = config_option(TrainConfig, "lr")
Wd = config_option(TrainConfig, "weight_decay")
Warmup = config_option(TrainConfig, "warmup_steps", "--warmup")
Sched = config_option(TrainConfig, "schedule")
Clip = config_option(TrainConfig, "grad_clip", note="here 0 = off")
Ema = config_option(TrainConfig, "ema_decay", "--ema", note="e.g. 0.999; the EMA weights are saved")
Patience = config_option(TrainConfig, "patience")
Augment = config_option(TrainConfig, "augment", note="none, crop, flip or crop_flip; none keeps the teacher cache")
Mixup = config_option(TrainConfig, "mixup")
Cutmix = config_option(TrainConfig, "cutmix")
Seed = config_option(TrainConfig, "seed", note="also the data split")
CkptEvery = config_option(TrainConfig, "checkpoint_every", note="always every epoch")
Smooth = config_option(LossConfig, "label_smoothing")
TrainLimit = config_option(DataConfig, "train_limit")
TestLimit = config_option(DataConfig, "test_limit")
Tensorboard = Annotated[Optional[Path], typer.Option("--tensorboard", help="also write TensorBoard scalars here (needs tensorboard)")]
NoCache = Annotated[bool, typer.Option("--no-teacher-cache", help="run the teacher every step even when augmentation is off")]
Amp = config_option(TrainConfig, "amp")
ValFraction = config_option(DataConfig, "val_fraction")
AdapterMethod = config_option(AdapterConfig, "method", "--adapter", optional=True,
                              note="lora or loha; unset: full fine-tuning. The head and normalisation layers train "
                                   "alongside (peft modules_to_save, saved with the adapter)")
Rank = config_option(AdapterConfig, "rank", optional=True, note="default 8")
AdapterAlpha = config_option(AdapterConfig, "alpha", "--adapter-alpha")
AdapterDropout = config_option(AdapterConfig, "dropout", "--adapter-dropout")
TargetModules = Annotated[Optional[str], typer.Option(
    "--target-modules", help=AdapterConfig.model_fields["target_modules"].description + " (comma-separated)", rich_help_panel="Adapter")]
AdapterNorms = config_option(AdapterConfig, "train_norms", "--adapter-norms/--no-adapter-norms")
AdapterPath = Annotated[Optional[Path], typer.Option(
    "--adapter-path", help="continue training a saved adapter (a finetune --adapter output or its adapter/ folder) on MODEL, "
                           "which must be the base it was trained on (sha256 checked)", rich_help_panel="Adapter")]


def _splits(data: str | None, loaded, arch: str | None, *, seed: int, on_bad_image: str, train_limit: int | None,
            test_limit: int | None, mean: str | None, std: str | None, input_shape: str | None, channels: int | None,
            val_fraction: float, model_classes: bool = True):
    """The data mapped to the model's input, resolved as every command resolves it (inputspec).

    ``model_classes=False`` (finetune: a new head) takes the class order from the data, not the model."""
    from kdtoolkit.cli.options import parse_input_flags, resolve_model_input
    from kdtoolkit.data.inputspec import load_splits
    from kdtoolkit.errors import InputError

    flags = parse_input_flags(input_shape, channels, mean, std)
    if not data:
        raise InputError("--data is required (an ImageFolder, .tar.gz, .npz, or a built-in name such as mnist-mini)")
    spec = resolve_model_input(flags, loaded, arch)
    if not model_classes and spec.source.get("classes") == "model":
        spec.classes = None
        del spec.source["classes"]
    return load_splits(data, spec, seed=seed, on_bad_image=on_bad_image, train_limit=train_limit, test_limit=test_limit,
                       val_fraction=val_fraction)


def _train_config(**kw: Any):
    from pydantic import ValidationError

    from kdtoolkit.config import TrainConfig
    from kdtoolkit.errors import InputError

    try:
        return TrainConfig.model_validate(kw)
    except ValidationError as exc:
        raise InputError(validation_line(exc)) from None


def _schedule(start: float, end: float | None, kind: str) -> dict[str, Any]:
    return {"start": start, "end": end, "kind": kind if end is not None else "constant"}


def _work_dir(out: Path, key: dict[str, Any]) -> Path:
    from kdtoolkit import fsutil

    return out.parent / f".{out.name}.work-{fsutil.stable_hash(key)[:12]}"


def _write(out: Path, stage: str, cfg, model, recipe: dict[str, Any], splits, result: dict[str, Any], work: Path,
           extra_metrics: dict[str, Any], extra_info: dict[str, Any], teacher_logits=None, write_extra=None) -> dict[str, Any]:
    """The distill stage's own artifact writer (kdtoolkit.stages.write_trained): the same manifest as compress's 02-distill."""
    from kdtoolkit.stages import write_trained

    art = write_trained(out, stage, {**result, "model": model}, recipe, splits, work, config=cfg.model_dump(mode="json"),
                        teacher_logits=teacher_logits, extra_metrics=extra_metrics, extra_info=extra_info, write_extra=write_extra)
    return dict(art.metrics)


def _report(out: Path, metrics: dict[str, Any], json_out: Path | None) -> None:
    from kdtoolkit import fsutil

    if json_out:
        fsutil.write_json(json_out, {"artifact": str(out), **metrics})
    typer.echo(f"wrote {out / 'model.pt'}: test top-1 {100 * metrics['accuracy']:.2f} % "
               f"(best val {100 * metrics['best_val_accuracy']:.2f} % at epoch {metrics['best_epoch']}, {metrics['steps']} steps)")


@app.command("distill")
def distill_cmd(
    teacher: ModelArg,
    out: Out,
    student: Annotated[Optional[str], typer.Argument(help="student model file or artifact (or give --student-arch)")] = None,
    data: Data = None,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    student_arch: Annotated[Optional[str], typer.Option("--student-arch", help="build a fresh student of this architecture")] = None,
    student_width: Annotated[Optional[float], typer.Option("--student-width", help="width multiplier for --student-arch (zoo archs)")] = None,
    extra_teacher: Annotated[Optional[list[str]], typer.Option("--extra-teacher", help="another teacher (repeat): multi-teacher KD")] = None,
    teacher_weights: Annotated[Optional[str], typer.Option("--teacher-weights", help="fixed teacher weights, comma-separated")] = None,
    teacher_weighting: config_option(LossConfig, "teacher_weighting") = config_default(LossConfig, "teacher_weighting"),
    optimizer: Optim = config_default(TrainConfig, "optimizer"),
    epochs: Epochs = config_default(TrainConfig, "epochs"),
    max_steps: MaxSteps = None,
    batch_size: BatchSize = config_default(TrainConfig, "batch_size"),
    lr: Lr = config_default(TrainConfig, "lr"),
    weight_decay: Wd = config_default(TrainConfig, "weight_decay"),
    warmup: Warmup = config_default(TrainConfig, "warmup_steps"),
    schedule: Sched = config_default(TrainConfig, "schedule"),
    grad_clip: Clip = config_default(TrainConfig, "grad_clip"),
    ema: Ema = None,
    patience: Patience = None,
    augment: Augment = config_default(TrainConfig, "augment"),
    mixup: Mixup = config_default(TrainConfig, "mixup"),
    cutmix: Cutmix = config_default(TrainConfig, "cutmix"),
    seed: Seed = 0,
    checkpoint_every: CkptEvery = None,
    alpha: Annotated[float, typer.Option("--alpha", help="weight of the soft-target term")] = 0.9,
    alpha_end: Annotated[Optional[float], typer.Option("--alpha-end", help="alpha at the end of training (schedule)")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="KD temperature")] = 4.0,
    temperature_end: Annotated[Optional[float], typer.Option("--temperature-end", help="T at the end of training (schedule)")] = None,
    schedule_kind: Annotated[str, typer.Option("--kd-schedule", help="shape of the alpha/T schedules: linear or cosine")] = "linear",
    label_smoothing: Smooth = config_default(LossConfig, "label_smoothing"),
    hint_weight: config_option(LossConfig, "hint_weight") = config_default(LossConfig, "hint_weight"),
    hints: Annotated[Optional[str], typer.Option("--hints", help="hint pairs student[:teacher],...; default: pair stages by spatial size")] = None,
    at_weight: config_option(LossConfig, "at_weight") = config_default(LossConfig, "at_weight"),
    at_layers: Annotated[Optional[str], typer.Option("--at-layers", help="AT pairs student[:teacher],...; default: automatic")] = None,
    no_teacher_cache: NoCache = False,
    amp: Amp = False,
    train_limit: TrainLimit = None,
    test_limit: TestLimit = None,
    val_fraction: ValFraction = config_default(DataConfig, "val_fraction"),
    on_bad_image: BadImage = config_default(DataConfig, "on_bad_image"),
    mean: Mean = None,
    std: Std = None,
    input_shape: InputShape = None,
    channels: Channels = None,
    tensorboard: Tensorboard = None,
    quiet: Quiet = False,
    json_out: JsonOut = None,
    sets: Set = None,
) -> None:
    """Distil TEACHER into STUDENT (KD, hints, attention transfer, several teachers) with the one trainer."""
    from kdtoolkit.distill.trainer import Trainer, dist_info
    from kdtoolkit.errors import InputError
    from kdtoolkit.models.loading import build_arch, load_model

    rank = dist_info()[0]
    if (student is None) == (student_arch is None):
        raise InputError("give the student as a model file/artifact or as --student-arch NAME (one of them)")
    t = load_model(teacher, arch=arch, trust_pickle=trust_pickle)
    extra = [load_model(p, arch=arch, trust_pickle=trust_pickle) for p in (extra_teacher or [])]
    splits = _splits(data, t, arch, seed=seed, on_bad_image=on_bad_image, train_limit=train_limit, test_limit=test_limit,
                     mean=mean, std=std, input_shape=input_shape, channels=channels, val_fraction=val_fraction)
    spec = splits.spec
    if student_arch:
        from kdtoolkit.models.loading import _arch_kwargs

        kw = _arch_kwargs(student_arch, len(spec.classes), spec.channels, tuple(spec.input_size))
        if student_width is not None:
            kw["width"] = student_width
        import torch

        torch.manual_seed(seed)
        s_module = build_arch(student_arch, **kw)
        recipe: dict[str, Any] = {"arch": student_arch, "arch_kwargs": kw, "transforms": []}
        s_source = f"arch:{student_arch}:{kw}"
    else:
        s = load_model(student, trust_pickle=trust_pickle)
        if not s.rewritable or s.recipe is None:
            raise InputError(f"{student}: the student must be a trainable eager model with a recipe (a kdtoolkit checkpoint or artifact)")
        s_module, recipe, s_source = s.module, s.recipe, str(Path(student).resolve())
    weights = list(parse_floats(teacher_weights, "--teacher-weights") or []) or None
    cfg = _train_config(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup, schedule=schedule, grad_clip=grad_clip or None, ema_decay=ema, patience=patience, augment=augment,
        mixup=mixup, cutmix=cutmix, amp=amp, seed=seed, checkpoint_every=checkpoint_every, cache_teacher=not no_teacher_cache,
        loss={"name": "kd", "alpha": _schedule(alpha, alpha_end, schedule_kind), "temperature": _schedule(temperature, temperature_end, schedule_kind),
              "label_smoothing": label_smoothing, "hint_weight": hint_weight, "hints": hints.split(",") if hints else [],
              "at_weight": at_weight, "at_layers": at_layers.split(",") if at_layers else [], "teacher_weights": weights,
              "teacher_weighting": teacher_weighting},
    )
    from kdtoolkit.config import apply_overrides

    cfg = apply_overrides(cfg, sets, prefix="train")  # --set lr=0.01 or --set train.lr=0.01
    teachers = [t.module] + [e.module for e in extra]
    key = {"cmd": "distill", "cfg": cfg.model_dump(mode="json"), "teachers": [str(Path(p).resolve()) for p in [teacher, *(extra_teacher or [])]],
           "student": s_source, "data": [data, train_limit, test_limit, on_bad_image, mean, std, input_shape, val_fraction]
                 + ([channels] if channels is not None else [])}
    work = _work_dir(out, key)
    result = Trainer(cfg, work, progress=not quiet, tensorboard=tensorboard).fit(s_module.train(), splits,
                                                                                  teacher=teachers if len(teachers) > 1 else teachers[0])
    if rank != 0:
        return
    from kdtoolkit.evaluate import evaluate

    t_eval = evaluate(t.module, splits.test, spec)
    metrics = _write(out, "distill", cfg, result["model"], recipe, splits, result, work,
                     {"teacher_accuracy": t_eval["accuracy"]}, {"teachers": key["teachers"]}, teacher_logits=t_eval["logits"])
    _report(out, metrics, json_out)


@app.command("finetune")
def finetune_cmd(
    model: ModelArg,
    out: Out,
    data: Data = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="classes of the new head (default: the data's)")] = None,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    reset_head: Annotated[bool, typer.Option("--reset-head", help="new head even when the class count already fits")] = False,
    freeze_backbone: Annotated[bool, typer.Option("--freeze-backbone", help="train only the head (and unfrozen stages)")] = False,
    freeze_stages: Annotated[int, typer.Option("--freeze-stages", help="freeze the first N stages")] = 0,
    unfreeze_every: Annotated[Optional[int], typer.Option("--unfreeze-every", help="gradual unfreezing: one more stage every k epochs")] = None,
    backbone_lr_scale: Annotated[float, typer.Option("--backbone-lr-scale", help="lr multiplier of the pretrained layers (head = 1)")] = 1.0,
    optimizer: Optim = "sgd",
    epochs: Epochs = 3,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = 128,
    lr: Lr = 0.01,
    weight_decay: Wd = 5e-4,
    warmup: Warmup = 0,
    schedule: Sched = "cosine",
    grad_clip: Clip = 5.0,
    ema: Ema = None,
    patience: Patience = None,
    augment: Augment = "crop_flip",
    mixup: Mixup = 0.0,
    cutmix: Cutmix = 0.0,
    seed: Seed = 0,
    checkpoint_every: CkptEvery = None,
    label_smoothing: Smooth = 0.0,
    amp: Amp = False,
    train_limit: TrainLimit = None,
    test_limit: TestLimit = None,
    val_fraction: ValFraction = 0.1,
    on_bad_image: BadImage = "fail",
    mean: Mean = None,
    std: Std = None,
    input_shape: InputShape = None,
    channels: Channels = None,
    tensorboard: Tensorboard = None,
    quiet: Quiet = False,
    json_out: JsonOut = None,
    adapter: AdapterMethod = None,
    rank: Rank = None,
    adapter_alpha: AdapterAlpha = None,
    adapter_dropout: AdapterDropout = config_default(AdapterConfig, "dropout"),
    target_modules: TargetModules = None,
    adapter_norms: AdapterNorms = config_default(AdapterConfig, "train_norms"),
    adapter_path: AdapterPath = None,
) -> None:
    """Fine-tune MODEL on new data: new head, frozen or gradually unfrozen stages, lower lr for pretrained layers.

    With --adapter lora|loha only peft adapters (plus the head and, unless --no-adapter-norms, the normalisation
    layers) train; OUT gets the merged model (model.pt, what compress takes) and the adapter alone in OUT/adapter."""
    from kdtoolkit.distill.finetune import replace_head, stage_names
    from kdtoolkit.distill.trainer import Trainer, dist_info
    from kdtoolkit.errors import InputError
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.models.loading import load_model

    rank_ = dist_info()[0]
    acfg, ref = _adapter_setup(model, adapter, rank, adapter_alpha, adapter_dropout, target_modules, adapter_norms, adapter_path,
                               freeze_backbone=freeze_backbone, freeze_stages=freeze_stages, unfreeze_every=unfreeze_every,
                               backbone_lr_scale=backbone_lr_scale)
    m = load_model(model, arch=arch or (ref["base"]["arch"] if ref else None), trust_pickle=trust_pickle)
    if not m.rewritable:
        raise InputError(f"{model}: a {m.form} model cannot be fine-tuned here; give a state dict with --arch or a kdtoolkit checkpoint")
    if acfg is not None and ref is None:
        from kdtoolkit.adapters import plan
        from kdtoolkit.distill.finetune import find_head

        plan(m.module, acfg, find_head(m.module))  # rank, targets: refused before the data loads
    splits = _splits(data, m, arch, seed=seed, on_bad_image=on_bad_image, train_limit=train_limit, test_limit=test_limit,
                     mean=mean, std=std, input_shape=input_shape, channels=channels, val_fraction=val_fraction,
                     model_classes=False)
    k = num_classes or len(splits.spec.classes)
    if k != len(splits.spec.classes):
        raise InputError(f"--num-classes {k} but the data has {len(splits.spec.classes)} classes")
    recipe = dict(m.recipe or {"arch": arch, "arch_kwargs": {}, "transforms": []})
    recipe["arch_kwargs"] = dict(recipe.get("arch_kwargs", {}))
    base_recipe = copy.deepcopy(recipe)
    if ref is not None and k != int(ref["base"]["num_classes"]):
        raise InputError(f"the adapter at {adapter_path} has a {ref['base']['num_classes']}-class head but the data has {k} classes")
    before = None
    try:
        before = evaluate(m.module, splits.test, splits.spec)["accuracy"]
    except InputError:
        pass  # the old head does not fit the new classes
    head, replaced = replace_head(m.module, k, recipe, force=reset_head)
    stages = stage_names(m.module, head)
    n_freeze = len(stages) if freeze_backbone else freeze_stages
    if n_freeze > len(stages):
        raise InputError(f"--freeze-stages {n_freeze} but the model has {len(stages)} stages: {', '.join(stages)}")
    if unfreeze_every and not n_freeze:
        raise InputError("--unfreeze-every needs --freeze-backbone or --freeze-stages N")
    trainee, adapter_plan = m.module, None
    if acfg is not None:
        from kdtoolkit import adapters

        if ref is not None:
            trainee = adapters.apply_adapter(m.module, ref, trainable_=True)
            adapter_plan = {"targets": ref["targets"], "modules_to_save": ref["modules_to_save"]}
        else:
            trainee, adapter_plan = adapters.attach(m.module, acfg, head, seed=seed)
    scales = {"": backbone_lr_scale, head: 1.0} if backbone_lr_scale != 1.0 else {}
    cfg = _train_config(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup, schedule=schedule, grad_clip=grad_clip or None, ema_decay=ema, patience=patience, augment=augment,
        mixup=mixup, cutmix=cutmix, amp=amp, seed=seed, checkpoint_every=checkpoint_every, lr_scales=scales,
        freeze=stages[:n_freeze], unfreeze_every=unfreeze_every, loss={"name": "ce", "label_smoothing": label_smoothing},
    )
    key = {"cmd": "finetune", "cfg": cfg.model_dump(mode="json"), "model": str(Path(model).resolve()), "k": k, "reset": reset_head,
           "data": [data, train_limit, test_limit, on_bad_image, mean, std, input_shape, val_fraction]
                 + ([channels] if channels is not None else [])}
    if acfg is not None:  # a different adapter (or a different saved one to continue) is a different run
        key["adapter"] = {**acfg.model_dump(mode="json"), "from": ref["base"]["sha256"] + ":" + str(Path(ref["dir"]).resolve()) if ref else None}
    work = _work_dir(out, key)
    if rank_ == 0 and not quiet:
        typer.echo(f"head {head} ({'new, ' if replaced else 'kept, '}{k} classes); stages {', '.join(stages)}; "
                   f"frozen at start: {', '.join(stages[:n_freeze]) or 'none'}", err=True)
        if acfg is not None:
            from kdtoolkit.adapters import trainable

            t = trainable(trainee)
            typer.echo(f"{acfg.method} rank {acfg.rank} on {len(adapter_plan['targets'])} layers; trained alongside: "
                       f"{len(adapter_plan['modules_to_save'])} head/norm modules; {t['trainable_params']:,} trainable parameters", err=True)
    result = Trainer(cfg, work, progress=not quiet, tensorboard=tensorboard).fit(trainee.train(), splits)
    if rank_ != 0:
        return
    extra_metrics: dict[str, Any] = {"accuracy_before": before, "head_replaced": replaced}
    extra_info: dict[str, Any] = {"head": head, "stages": stages, "source": str(model)}
    final, write_extra = result["model"], None
    if acfg is not None:
        final, write_extra, am, ai = _adapter_outputs(result["model"], acfg, adapter_plan, splits, work, model=model, arch=m.arch or arch,
                                                      base_recipe=base_recipe, head=head, k=k, replaced=replaced or bool(ref and ref["base"]["head_replaced"]))
        extra_metrics.update(am)
        extra_info.update(ai)
    metrics = _write(out, "finetune", cfg, final, recipe, splits, {**result, "model": final}, work, extra_metrics, extra_info,
                     write_extra=write_extra)
    if before is not None and not quiet:
        typer.echo(f"test top-1 before fine-tuning: {100 * before:.2f} %")
    if acfg is not None and not quiet:
        typer.echo(f"adapter ({metrics['adapter_bytes']:,} bytes, {metrics['trainable_params']:,} trained parameters) in {out / 'adapter'}; "
                   f"merged model: max |logit diff| {metrics['merge_max_abs_diff']:.2e} against the adapted one")
    _report(out, metrics, json_out)


def _adapter_setup(model: str, method: str | None, rank: int | None, alpha: float | None, dropout: float, target_modules: str | None,
                   norms: bool, adapter_path: Path | None, **full_ft: Any) -> tuple[AdapterConfig | None, dict[str, Any] | None]:
    """The adapter settings, validated before any model loads (one-line errors): a new adapter, or a saved one to continue.

    A saved adapter brings its own settings and must have been trained on MODEL (sha256)."""
    from pydantic import ValidationError

    from kdtoolkit.errors import InputError

    new = {"method": method, "rank": rank, "alpha": alpha, "target_modules": target_modules}
    if adapter_path is None and method is None:
        given = [f"--{k.replace('_', '-')}" for k, v in new.items() if v is not None and k != "method"]
        if given:
            raise InputError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --adapter lora|loha (or --adapter-path DIR)")
        return None, None
    if full_ft["freeze_backbone"] or full_ft["freeze_stages"] or full_ft["unfreeze_every"] or full_ft["backbone_lr_scale"] != 1.0:
        raise InputError("--adapter trains only adapters, head and norms: it does not combine with --freeze-backbone, "
                         "--freeze-stages, --unfreeze-every or --backbone-lr-scale")
    ref = None
    if adapter_path is not None:
        from kdtoolkit import adapters

        ref = adapters.read_adapter(adapter_path)
        adapters.check_base(ref, model)
        saved = AdapterConfig.model_validate(ref["config"])
        clash = [f"{flag} {v}" for flag, v, s in (("--adapter", method, saved.method), ("--rank", rank, saved.rank),
                                                   ("--adapter-alpha", alpha, saved.alpha)) if v is not None and v != s]
        if clash or target_modules is not None:
            raise InputError(f"--adapter-path continues the saved adapter ({saved.method}, rank {saved.rank}); "
                             f"drop {', '.join(clash) or '--target-modules'}")
        return saved, ref
    try:
        cfg = AdapterConfig.model_validate({
            "method": method, "rank": rank if rank is not None else AdapterConfig.model_fields["rank"].default, "alpha": alpha,
            "dropout": dropout, "train_norms": norms,
            "target_modules": [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else []})
    except ValidationError as exc:
        raise InputError(f"adapter option {validation_line(exc)}") from None
    return cfg, None


def _adapter_outputs(adapted, cfg: AdapterConfig, adapter_plan: dict[str, Any], splits, work: Path, *, model: str, arch: str | None,
                     base_recipe: dict[str, Any], head: str, k: int, replaced: bool):
    """Merge the trained adapter (the merged model is the artifact's model.pt) and write the adapter alone beside it.

    The merge is checked on real test images: the max |logit diff| between adapted and merged goes in the metrics."""
    import torch

    from kdtoolkit import adapters
    from kdtoolkit.data.datasets import to_tensor

    merged = adapters.merge(adapted)
    n = min(64, len(splits.test))
    x = to_tensor(splits.test.x[:n], splits.spec)
    with torch.no_grad():
        diff = float((adapted.eval()(x) - merged(x)).abs().max()) if n else 0.0
    base = adapters.base_reference(model, arch=arch, recipe=base_recipe, head=head, num_classes=k, head_replaced=replaced)
    staged = adapters.save_adapter(adapted, work / "adapter", base=base, cfg=cfg, adapter_plan=adapter_plan, meta=splits.spec.to_dict())
    metrics = {"adapter": cfg.method, "rank": cfg.rank, **adapters.trainable(adapted), "merge_max_abs_diff": diff,
               "adapter_bytes": (staged / "adapter_model.safetensors").stat().st_size}
    info = {"adapter": {"dir": "adapter", "config": cfg.model_dump(mode="json"), "targets": adapter_plan["targets"],
                        "modules_to_save": adapter_plan["modules_to_save"], "base_sha256": base["sha256"]}}

    def writer(folder: Path) -> None:
        import shutil

        shutil.copytree(staged, folder / "adapter")

    return merged, writer, metrics, info
