"""Every pydantic configuration of kdtoolkit, plus ``load_config`` / ``save_config``.

This module imports no torch (tested): reading, validating and writing a run's ``config.yaml``
is cheap, and the CLI can check a configuration before any heavy library loads. Names that
select registered things (loss names) are validated here against the registries' names; the
registries themselves live beside their implementations (``kdtoolkit.distill.losses``) and a
test keeps the lists equal. Schemes and calibration methods are ``Literal`` fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdtoolkit import fsutil
from kdtoolkit.distill.schedules import Schedule
from kdtoolkit.errors import InputError

# names registered in kdtoolkit.distill.losses.LOSSES (tests/test_config.py keeps them equal)
LOSS_NAMES = ("ce", "dist", "dkd", "kd", "multi_kd")
M = TypeVar("M", bound=BaseModel)


# ---- distillation ----

class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("kd", description="registered loss: kd (Hinton 2015), dkd (decoupled KD, Zhao 2022), dist (relation KD, Huang 2022) or ce (labels only)")
    alpha: Schedule = Field(default_factory=lambda: Schedule(start=0.9), description="weight of the soft-target term")
    temperature: Schedule = Field(default_factory=lambda: Schedule(start=4.0), description="softmax temperature T")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the hard-label term")
    hint_weight: float = Field(0.0, ge=0, description="weight of the FitNets hint loss (0 = off)")
    hints: list[str] = Field(default_factory=list, description="hint pairs 'student[:teacher]' module names; empty = pair stage outputs by spatial size")
    at_weight: float = Field(0.0, ge=0, description="weight of the attention-transfer loss (0 = off; the paper uses 1000)")
    at_layers: list[str] = Field(default_factory=list, description="attention-transfer pairs 'student[:teacher]'; empty = automatic")
    hidden_weight: float | None = Field(None, ge=0, description="transformer student: weight of the hidden-state MSE "
                                                                 "(TinyBERT layer map; None = 1 for a transformer pair, else off)")
    attn_weight: float | None = Field(None, ge=0, description="transformer student: weight of the attention-map KL "
                                                               "(MiniLM; None = 1 for a transformer pair, else off)")
    distill_token: Literal["hard", "soft"] = Field(
        "hard", description="a student with a DeiT distillation token (e.g. --student-arch cifar_deit): its distillation "
                            "head learns the teacher's argmax (hard, DeiT's best) or its softened logits (soft, weight alpha)")
    teacher_weights: list[float] | None = Field(None, description="fixed weights of several teachers (None = equal)")
    teacher_weighting: Literal["fixed", "confidence", "ce"] = Field(
        "fixed", description="multi-teacher: fixed weights, or per sample by teacher max-softmax confidence or by CE on the label")

    @field_validator("name")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        if v not in LOSS_NAMES:
            raise ValueError(f"unknown loss {v!r}; known: {', '.join(LOSS_NAMES)}")
        return v

    @property
    def uses_features(self) -> bool:
        """Feature losses asked for explicitly (the transformer ones also switch on by themselves: ``transformer_weights``)."""
        return self.hint_weight > 0 or self.at_weight > 0 or bool(self.hidden_weight) or bool(self.attn_weight)

    def transformer_weights(self, pair: bool) -> tuple[float, float]:
        """(hidden, attention) weights: unset ones are 1 when teacher and student are both transformers, else 0."""
        return (self.hidden_weight if self.hidden_weight is not None else float(pair),
                self.attn_weight if self.attn_weight is not None else float(pair))


class TrainConfig(BaseModel):
    """Everything that decides a training run; hashed to decide whether a stage can be skipped."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(3, ge=0, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (a budget)")
    time_budget_min: float | None = Field(None, gt=0, description="size the schedule to end within this many minutes of training: "
                                                               "the step count is fitted from the first steps' measured time "
                                                               "(validation included) and replaces epochs")
    batch_size: int = Field(128, ge=1, description="per-process batch size")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimiser")
    lr: float = Field(0.05, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (Nesterov)")
    weight_decay: float = Field(5e-4, ge=0, description="decoupled for AdamW, L2 for SGD")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    grad_clip: float | None = Field(5.0, gt=0, description="max gradient norm, None to disable")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights and evaluate it")
    patience: int | None = Field(None, ge=1, description="early stopping: epochs without val improvement")
    augment: Literal["none", "crop", "flip", "crop_flip"] = Field("none", description="batch augmentation")
    mixup: float = Field(0.0, ge=0, description="mixup Beta(a, a); 0 = off")
    cutmix: float = Field(0.0, ge=0, description="cutmix Beta(a, a); 0 = off")
    amp: bool = Field(False, description="mixed precision (CUDA only)")
    channels_last: bool = Field(True, description="train in channels-last memory format (measured 1.36x the steps/s for a separable student on CPU)")
    seed: int = Field(0, description="seed for order, augmentation and init")
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N steps")
    cache_teacher: bool = Field(True, description="cache teacher logits on disk when augmentation is off")
    augment_views: int = Field(0, ge=0, description="with --augment: teacher logits for this many fixed augmented views per image, "
                                                   "computed once (ONNX Runtime) and reused every epoch, as FKD does; 0 = live teacher")
    sync_bn: bool = Field(True, description="SyncBatchNorm under DDP so N processes match one")
    lr_scales: dict[str, float] = Field(default_factory=dict, description="lr multiplier per parameter-name prefix (longest match wins; '' = all)")
    freeze: list[str] = Field(default_factory=list, description="module-name prefixes frozen at the start (in model order)")
    unfreeze_every: int | None = Field(None, ge=1, description="gradual unfreezing: unfreeze the deepest frozen one every N epochs")
    loss: LossConfig = Field(default_factory=LossConfig)
    eval_batch_size: int = Field(512, ge=1, description="batch for validation")


# ---- adapters (peft) ----

ADAPTER_METHODS = ("lora", "loha")


class AdapterConfig(BaseModel):
    """Parameter-efficient fine-tuning through peft (kdtoolkit.adapters): which method, how big, on which layers."""

    model_config = ConfigDict(extra="forbid")
    method: str = Field("lora", description="peft method: lora (Hu et al. 2021) or loha (Hadamard-product LoRA, LyCORIS); "
                                            "both adapt Linear and Conv2d layers and merge into them for export")
    rank: int = Field(8, ge=1, description="adapter rank r; at most min(out, in x kernel area) of every targeted layer")
    alpha: float | None = Field(None, gt=0, description="scaling numerator (update scaled by alpha / rank); default: the rank (scale 1)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter path (LoRA: lora_dropout; LoHa: rank_dropout)")
    target_modules: list[str] = Field(default_factory=list, description="module-name patterns (fnmatch) of the Linear/Conv2d layers to adapt; "
                                                                        "empty = every Linear and ungrouped Conv2d except the head")
    train_norms: bool = Field(True, description="normalisation layers (BatchNorm, LayerNorm, GroupNorm) train alongside and are saved "
                                                "with the adapter (peft modules_to_save)")
    train_head: bool = Field(True, description="the classifier head trains alongside and is saved with the adapter (peft modules_to_save)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in ADAPTER_METHODS:
            raise ValueError(f"unknown adapter method {v!r}; known: {', '.join(ADAPTER_METHODS)}")
        return v


# ---- student ----

class StudentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str | None = Field(None, description="build this architecture instead of converting the teacher")
    arch_width: float | None = Field(None, gt=0, description="width multiplier for a zoo student_arch")
    separable: bool = Field(True, description="depthwise-separable conversion of standard KxK convs")
    skip_stem: bool = Field(True, description="keep the first conv standard (few input channels: rank-1 is poor there)")
    skip_first: int = Field(0, ge=0, description="also keep the first N convertible convs")
    skip: list[str] = Field(default_factory=list, description="module names or patterns to keep standard")
    only: list[str] = Field(default_factory=list, description="convert only inside these module names (stages)")
    depth: float = Field(1.0, gt=0, le=1, description="fraction of shape-preserving blocks kept per stage")
    keep_blocks: dict[str, int] = Field(
        default_factory=dict, description="blocks kept in named stages, over --depth there (e.g. {layer1: 0, layer3: 4}); "
                                          "0 removes a stage whose blocks all keep their input's shape")
    width: float = Field(1.0, gt=0, le=1, description="fraction of channels kept (Torch-Pruning dependency graph)")
    width_importance: Literal["l2", "bn"] = Field("l2", description="channel importance: group weight L2 norm or BN scale")
    channel_multiple: int | None = Field(None, ge=1, description="round channel counts to this; default: the profile's")
    latency_budget_ms: float | None = Field(None, gt=0, description="search depth/width for the most capable student within this p50 at the profile's opt batch")
    speedup: float | None = Field(None, gt=1, description="search depth/width for the most capable student at least this many times faster than the teacher at the profile's opt batch; default: 2x when the plain separable student is not")
    blocks: int | None = Field(None, ge=1, description="transformer teacher: blocks the student keeps (default: from --depth)")
    heads: int | None = Field(None, ge=1, description="transformer teacher: attention heads per block (default: from --width)")
    mlp_hidden: int | None = Field(None, ge=1, description="transformer teacher: MLP hidden units per block (default: from --width)")
    block_select: Literal["uniform", "cosine"] = Field(
        "uniform", description="transformer teacher: keep evenly spaced blocks (TinyBERT's mapping) or those that change "
                               "their input most on a calibration batch (1 - cosine of block input and output)")
    init: Literal["svd", "random"] = Field("svd", description="teacher-initialised rank-1 weights, or fresh init")
    bn_recalib_batches: int = Field(20, ge=0, description="batches to re-estimate BatchNorm statistics after surgery")


# ---- quantization-aware training ----

class QatConfig(BaseModel):
    """Budget and knobs of the QAT run (kept small by default: the demo must stay fast)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1, ge=0, description="passes over the training split")
    max_steps: int | None = Field(60, ge=1, description="optimiser step budget (None = all epochs)")
    batch_size: int = Field(128, ge=1, description="batch size")
    lr: float = Field(0.002, gt=0, description="peak learning rate (fine-tuning: small)")
    learn_scales: bool = Field(True, description="train activation scales (LSQ gradient), else keep calibrated ones")
    init: Literal["minmax", "mse", "percentile"] = Field("mse", description="activation-range initialisation from calibration")
    calib_size: int | None = Field(None, ge=1, description="calibration samples; default: the profile's calib_size")
    seed: int = Field(0, description="seed for order and calibration subset")


# ---- INT8 ----


class Int8Config(BaseModel):
    """How ``quant.ptq.build_int8`` makes and checks the INT8 model (the quantize stage fills it from the profile)."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["ptq", "qat"] = Field("ptq", description="QAT (needs the torch student) or PTQ")
    calib_method: Literal["minmax", "entropy", "percentile", "mse"] = Field("minmax", description="PTQ calibration")
    mode: Literal["static", "dynamic"] = Field(
        "static", description="static: QDQ with calibrated activation ranges (every backend); dynamic: ONNX Runtime's "
        "quantize_dynamic, int8 MatMul/Gemm weights and activation ranges computed at run time (ORT CPU only, no calibration; "
        "measured faster for ViTs on ORT CPU, see benchmarks/results/vit_int8.json)")
    calib_size: int = Field(512, ge=1, description="calibration samples from the training split")
    percentile: float = Field(99.99, gt=50, le=100, description="for calib_method=percentile")
    tolerance_points: float = Field(1.0, ge=0, description="INT8 may lose this many top-1 points before layers fall back to float")
    opset: int = Field(17, ge=7, description="opset of the exported QAT model")
    val_limit: int = Field(1000, ge=1, description="validation samples for the sensitivity fallback")
    seed: int = Field(0, description="seed of the calibration and validation samples")


# ---- compress ----

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(description="ImageFolder, .tar.gz, .npz, or a built-in dataset name")
    input_size: tuple[int, int] | None = Field(None, description="H, W of the model input; default: the images'")
    channels: int | None = Field(None, description="model input channels; default: the images'")
    mean: tuple[float, ...] | None = Field(None, description="normalisation mean per channel; default: teacher metadata or measured")
    std: tuple[float, ...] | None = Field(None, description="normalisation std per channel")
    class_names: list[str] | None = Field(None, description="class order; default: teacher metadata, else sorted folder names")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="validation carved from train")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="test share when the data has no split")
    seed: int = Field(0, description="split seed")
    on_bad_image: str = Field("fail", description="fail or skip on unreadable images")
    train_limit: int | None = Field(None, ge=1, description="use a seeded subset of the training split")
    test_limit: int | None = Field(None, ge=1, description="use a seeded subset of the test split")

    @field_validator("on_bad_image")
    @classmethod
    def _fail_or_skip(cls, v: str) -> str:
        if v not in BAD_IMAGE_CHOICES:
            raise ValueError(f"must be fail or skip, got {v!r}")
        return v


BAD_IMAGE_CHOICES = ("fail", "skip")


class MeasureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batches: list[int] = Field(default_factory=lambda: [1, 64], description="batch sizes to time")
    warmup: int = Field(10, ge=0, description="untimed runs per candidate and batch")
    iters: int = Field(60, ge=5, description="timed interleaved rounds per batch")


class CompressConfig(BaseModel):
    """The resolved configuration of a run; saved as RUN/config.yaml and re-runnable with --config."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="teacher model file or artifact folder")
    arch: str | None = Field(None, description="architecture for a state-dict teacher")
    trust_pickle: bool = Field(False, description="allow unpickling a full module (runs code); covers every stage of the run")
    model_sha256: str | None = Field(None, description="sha256 of the model file when the run was configured; a rerun refuses a changed file")
    data: DataConfig
    profile: str = Field("ort-cpu", description="profile name or YAML path")
    profile_overrides: dict[str, Any] = Field(default_factory=dict, description="dotted profile fields set from flags")
    no_student: bool = Field(False, description="no student: export, INT8 (PTQ) with calibration, check and bundle the teacher itself")
    student: StudentConfig = Field(default_factory=StudentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    opset: int | None = Field(None, description="ONNX opset; default: the profile's max (at most 17)")
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    qat: QatConfig = Field(default_factory=QatConfig, description="QAT budget when the profile's quant.method is qat")
    build: bool = Field(False, description="also build the TensorRT engine in the run (stage 08-build): needs TensorRT and the target GPU "
                                           "on this machine; otherwise the bundle carries the on-device build commands")


def load_config(path: str | os.PathLike[str]) -> CompressConfig:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
        return CompressConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise InputError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except ValidationError as exc:
        e = exc.errors()[0]
        raise InputError(f"{p}: {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}") from None


def save_config(cfg: CompressConfig, path: Path) -> None:
    fsutil.write_text(path, yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))


def apply_overrides(model: M, pairs: list[str] | None, *, flag: str = "--set", prefix: str | None = None) -> M:
    """``--set a.b=VALUE`` (repeatable) on a config model: VALUE is read as YAML (numbers, booleans, lists,
    null), the key is a dotted path into the model, and the result is validated against the model, so an
    unknown key or a bad value is a one-line InputError naming the key. ``prefix`` (e.g. ``train``) may
    lead the key of a command whose whole config is that section (``distill --set train.lr=0.01``)."""
    if not pairs:
        return model
    data = model.model_dump(mode="json")
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"{flag} takes KEY=VALUE with a dotted key (e.g. train.lr=0.01), got {pair!r}")
        path = key.split(".")
        if prefix and len(path) > 1 and path[0] == prefix:
            path = path[1:]
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.setdefault(part, {})  # a new key is judged by validation (extra="forbid" names it)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise InputError(f"{flag} {key}: {'.'.join(path[:i + 1])} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    try:
        return type(model).model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(map(str, e["loc"]))
        raise InputError(f"{flag} {where}: {e['msg']}" + (" (no such setting)" if e["type"] == "extra_forbidden" else "")) from None
