"""One trainer for distillation, training alone and fine-tuning.

It checkpoints atomically every epoch (and every N steps) with everything needed to continue:
weights, optimiser, EMA, step, RNG states and history. The batch order and augmentation are pure
functions of (seed, epoch), so a run killed at any point and started again with the same command
ends with the same metrics on CPU. A NaN/inf loss stops with a clear error and keeps the last
good checkpoint. Under ``torchrun`` it trains with DistributedDataParallel (gloo on CPU, nccl on
GPU) and only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdtoolkit import fsutil
from kdtoolkit.config import LossConfig, TrainConfig  # noqa: F401  (re-exported: configs live in kdtoolkit.config)
from kdtoolkit.data.datasets import ArrayData, DataSpec, Splits, batches
from kdtoolkit.distill.losses import LOSSES, distillation_token_loss
from kdtoolkit.distill.schedules import lr_factor
from kdtoolkit.errors import InputError, TrainingDiverged
from kdtoolkit.progress import Progress, log


def dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class TeacherCache:
    """Teacher logits for the whole training split, computed once, stored as a memory-mapped .npy."""

    def __init__(self, teacher: Any, data: ArrayData, spec: DataSpec, path: Path, batch_size: int = 512) -> None:
        self.path = path
        if not path.exists():
            from kdtoolkit.evaluate import predict

            logits = predict(teacher, data, spec, batch_size).astype(np.float32)
            path.parent.mkdir(parents=True, exist_ok=True)
            with fsutil.atomic_path(path, suffix=".npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, logits)
        self.logits = np.load(path, mmap_mode="r")
        if self.logits.shape[0] != len(data):
            raise InputError(f"teacher cache {path} has {self.logits.shape[0]} rows for {len(data)} samples; delete it")

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.logits[idx.numpy()]))


class ViewBank:
    """Teacher logits for ``views`` fixed augmented views of every training image (FKD, Shen & Xing 2022).

    Augmentation needs the teacher live, which on a CPU costs most of a step; with the bank the teacher runs
    once over views x images (through ONNX Runtime when it is a torch module, faster than eager on a CPU) and
    every epoch trains on one of the stored views per image, its crop and flip replayed exactly. View ``v`` of
    image ``i`` is a pure function of (seed, v, i); the view an epoch uses is a pure function of (epoch, i).
    """

    def __init__(self, teacher: Any, data: ArrayData, spec: DataSpec, path: Path, *, views: int, mode: str, seed: int,
                 pad: int = 4, batch_size: int = 256, progress: bool = False) -> None:
        n = len(data)
        self.views, self.mode, self.pad = views, mode, pad
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + v) for v in range(views)]
        self.dy = torch.stack([torch.randint(0, 2 * pad + 1, (n,), generator=g) for g in gens])
        self.dx = torch.stack([torch.randint(0, 2 * pad + 1, (n,), generator=g) for g in gens])
        self.flip = torch.stack([torch.rand(n, generator=g) < 0.5 for g in gens])
        if not path.exists():
            self._fill(teacher, data, spec, path, batch_size, progress)
        self.logits = np.load(path, mmap_mode="r")
        if self.logits.shape[:2] != (views, n):
            raise InputError(f"teacher view bank {path} has shape {self.logits.shape[:2]} for {views} views x {n} images; delete it")

    def _fill(self, teacher: Any, data: ArrayData, spec: DataSpec, path: Path, batch_size: int, progress: bool) -> None:
        import tempfile

        from kdtoolkit.data.datasets import to_tensor
        from kdtoolkit.evaluate import as_predictor

        with tempfile.TemporaryDirectory(prefix="kdt-bank-") as tmp:
            run: Any = teacher
            self.runtime: dict[str, Any] = {"runtime": "torch"}
            if isinstance(teacher, nn.Module):
                from kdtoolkit.export.onnx_export import export_onnx

                try:
                    onnx = export_onnx(teacher, (1, spec.channels, *spec.input_size), Path(tmp) / "teacher.onnx")
                    run, self.runtime = self._fastest(str(onnx), data, spec, Path(tmp))
                except InputError:
                    pass  # a teacher that does not export runs in torch
            log(f"[distill] teacher view bank through {self.runtime['runtime']}"
                + (f" ({self.runtime['why']})" if self.runtime.get("why") else ""), enabled=progress)
            f = as_predictor(run)
            n = len(data)
            out = np.zeros((self.views, n, 0), np.float32)
            t0 = time.perf_counter()
            for v in range(self.views):
                rows = []
                for i in range(0, n, batch_size):
                    idx = torch.arange(i, min(i + batch_size, n))
                    x = self.augment(to_tensor(data.x[i:i + batch_size], spec), idx, v)
                    rows.append(np.asarray(f(x.numpy()), np.float32))
                view = np.concatenate(rows)
                if out.shape[2] == 0:
                    out = np.zeros((self.views, n, view.shape[1]), np.float32)
                out[v] = view
                log(f"[distill] teacher view bank: view {v + 1}/{self.views} ({time.perf_counter() - t0:.0f} s)", enabled=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.write_json(path.with_suffix(".json"), {**self.runtime, "views": self.views, "images": n,
                                                      "fill_s": round(time.perf_counter() - t0, 1)})
        with fsutil.atomic_path(path, suffix=".npy") as tmp_path:
            with open(tmp_path, "wb") as fh:
                np.save(fh, out)

    #: the INT8 teacher fills the bank only when its top-1 agrees with FP32's on this share of a sample
    MIN_AGREEMENT = 0.99

    @classmethod
    def _fastest(cls, fp32: str, data: ArrayData, spec: DataSpec, tmp: Path, sample: int = 512) -> tuple[str, dict[str, Any]]:
        """The teacher's FP32 ONNX, or its INT8 (kdtoolkit's ort-cpu PTQ) where that measures faster here and agrees.

        Why measure: INT8 is about 2x FP32 on a CPU with VNNI/AMX and slower without it (and on depthwise
        convs), so the machine decides. The INT8 teacher must agree with the FP32 one on top-1 for at least
        ``MIN_AGREEMENT`` of a seeded sample, or its soft targets are not the teacher's."""
        from kdtoolkit.data.datasets import to_tensor
        from kdtoolkit.evaluate import as_predictor
        from kdtoolkit.quant.ptq import align_input_channels, quantize_onnx
        from kdtoolkit.quant.schemes import scheme_for
        from kdtoolkit.targets import load_profile

        n = min(sample, len(data))
        if n < 64:
            return fp32, {"runtime": "onnxruntime fp32", "why": "too few images to check an INT8 teacher"}
        idx = np.sort(np.random.default_rng(0).choice(len(data), n, replace=False))
        x = to_tensor(data.x[idx], spec).numpy()
        int8 = str(tmp / "teacher.int8.onnx")
        try:
            quantize_onnx(fp32, int8, x[:256], scheme_for(load_profile("ort-cpu")), method="minmax")
            align_input_channels(int8)
        except Exception as e:  # noqa: BLE001  (a teacher INT8 cannot express stays FP32; the bank is still right)
            return fp32, {"runtime": "onnxruntime fp32", "why": f"INT8 teacher failed to build: {str(e).splitlines()[0][:120]}"}
        f32, f8 = as_predictor(fp32), as_predictor(int8)
        a32, a8 = np.asarray(f32(x)), np.asarray(f8(x))
        agree = float((a32.argmax(1) == a8.argmax(1)).mean())
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        batch = x[:256]
        for _ in range(3):  # interleaved: the machine is shared and noisy
            for name, f in (("fp32", f32), ("int8", f8)):
                t = time.perf_counter()
                f(batch)
                times[name].append(time.perf_counter() - t)
        t32, t8 = float(np.median(times["fp32"])), float(np.median(times["int8"]))
        info = {"fp32_s_per_256": round(t32, 4), "int8_s_per_256": round(t8, 4), "top1_agreement": agree}
        if t8 < t32 and agree >= cls.MIN_AGREEMENT:
            return int8, {"runtime": "onnxruntime int8", "why": f"{t32 / t8:.2f}x FP32, top-1 agrees on {100 * agree:.1f} %", **info}
        why = (f"INT8 agrees on only {100 * agree:.1f} % of top-1" if agree < cls.MIN_AGREEMENT
               else f"INT8 is not faster here ({t32 / t8:.2f}x)")
        return fp32, {"runtime": "onnxruntime fp32", "why": why, **info}

    def view_of(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        """The view each image trains on this epoch: every view once per ``views`` epochs, staggered across images."""
        return (idx + epoch) % self.views

    def augment(self, x: torch.Tensor, idx: torch.Tensor, view: int | torch.Tensor) -> torch.Tensor:
        from kdtoolkit.data.datasets import apply_augment

        v = view if isinstance(view, torch.Tensor) else torch.full_like(idx, view)
        return apply_augment(x, self.dy[v, idx], self.dx[v, idx], self.flip[v, idx], self.mode, self.pad)

    def __call__(self, idx: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.logits[view.numpy(), idx.numpy()]))


def _clock(seconds: float) -> str:
    """'ETA 12 min (09:58 UTC)': when training should end at the pace so far."""
    import datetime as dt

    end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
    return f"ETA {seconds / 60:.0f} min ({end:%H:%M} UTC)" if seconds >= 60 else f"ETA {seconds:.0f} s"


def _mix(x: torch.Tensor, y: torch.Tensor, n_cls: int, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (chosen at random when both are on); returns soft targets."""
    use = [m for m, a in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if a > 0]
    soft = torch.nn.functional.one_hot(y, n_cls).float()
    if not use:
        return x, soft
    kind = use[int(torch.randint(len(use), (1,), generator=gen))]
    a = cfg.mixup if kind == "mixup" else cfg.cutmix
    lam = float(torch.distributions.Beta(a, a).sample()) if a > 0 else 1.0
    perm = torch.randperm(x.shape[0], generator=gen)
    if kind == "mixup":
        x = lam * x + (1 - lam) * x[perm]
    else:
        h, w = x.shape[2:]
        rh, rw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
        y0, y1, x0, x1 = max(cy - rh // 2, 0), min(cy + rh // 2, h), max(cx - rw // 2, 0), min(cx + rw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, lam * soft + (1 - lam) * soft[perm]


def _n_outputs(model: Any, spec: DataSpec, who: str) -> int:
    """Output count on one sample, with the model named in the error when it cannot run."""
    from kdtoolkit.evaluate import as_predictor

    x = np.zeros((1, spec.channels, *spec.input_size), np.float32)
    try:
        return int(np.asarray(as_predictor(model)(x)).shape[-1])
    except Exception as exc:
        raise InputError(f"the {who} does not run on inputs of shape 1x{spec.channels}x{spec.input_size[0]}x{spec.input_size[1]}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _lr_scale(name: str, scales: dict[str, float]) -> float:
    best, scale = -1, 1.0
    for prefix, v in scales.items():
        if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
            best, scale = len(prefix), v
    return scale


def param_groups(model: nn.Module, cfg: TrainConfig, extra: list[nn.Parameter] | None = None) -> list[dict[str, Any]]:
    """Optimiser groups by (lr_scale, decay): a lower lr for pretrained layers is a group with lr_scale < 1.

    Frozen parameters stay in their group (their grad is None, so the optimiser skips them) so that
    gradual unfreezing needs no new optimiser and a checkpoint's optimiser state still fits."""
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    named = [(n, p) for n, p in model.named_parameters()] + [(f"__extra__.{i}", p) for i, p in enumerate(extra or [])]
    for n, p in named:
        if not p.requires_grad and not cfg.freeze:
            continue  # frozen by the caller for good (e.g. QAT's fixed parts): not optimised
        scale = 1.0 if n.startswith("__extra__") else _lr_scale(n, cfg.lr_scales)
        decay = p.ndim > 1 if cfg.optimizer == "sgd" else True
        groups.setdefault((scale, decay), []).append(p)
    out = []
    for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        out.append({"params": ps, "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0})
    return out


def apply_freeze(model: nn.Module, cfg: TrainConfig, epoch: int) -> list[str]:
    """Freeze cfg.freeze minus those unfrozen so far (deepest first, one every ``unfreeze_every`` epochs).

    Frozen modules get requires_grad False and BatchNorm in eval mode (their statistics stay pretrained).
    Returns the prefixes frozen now."""
    frozen = list(cfg.freeze)
    if cfg.unfreeze_every and frozen:
        n_open = min(len(frozen), epoch // cfg.unfreeze_every)
        frozen = frozen[: len(frozen) - n_open]
    mods = dict(model.named_modules())
    for n, p in model.named_parameters():
        p.requires_grad_(not any(n == f or n.startswith(f + ".") for f in frozen))
    for f in frozen:
        if f not in mods:
            import difflib

            close = difflib.get_close_matches(f, [m for m in mods if m], n=5, cutoff=0.4)
            raise InputError(f"cannot freeze {f!r}: no such module; close names: {', '.join(close)}")
        for m in mods[f].modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return frozen


class Trainer:
    """Train ``student`` (optionally distilling from ``teacher``) with checkpoints in ``work_dir``."""

    def __init__(self, cfg: TrainConfig, work_dir: str | os.PathLike[str], *, progress: bool = True,
                 tensorboard: str | os.PathLike[str] | None = None) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.progress = progress
        self.tensorboard = Path(tensorboard) if tensorboard else None
        self.rank, self.world, self.local_rank = dist_info()
        self.is_main = self.rank == 0

    # -- checkpoints --------------------------------------------------------------------------
    def _ckpt_path(self) -> Path:
        return self.work_dir / "last.pt"

    def _save(self, state: dict[str, Any]) -> None:
        if self.is_main:
            fsutil.torch_save(state, self._ckpt_path())

    def _load(self) -> dict[str, Any] | None:
        p = self._ckpt_path()
        if not p.exists():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            log(f"warning: checkpoint {p} unreadable, starting over", enabled=self.is_main)
            return None

    def _tb_writer(self) -> Any:
        if self.tensorboard is None or not self.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # tensorboard not installed
            log(f"note: --tensorboard needs the tensorboard package ({type(exc).__name__}); metrics are still in "
                f"{self.work_dir / 'metrics.jsonl'}; pip install tensorboard", enabled=True)
            return None
        return SummaryWriter(str(self.tensorboard))

    # -- the steps of fit() before the loop ------------------------------------------------------------
    def _check_inputs(self, student: nn.Module, teachers: list[Any], splits: Splits) -> bool:
        """Refuse batch/class mismatches in one line; return whether feature (hint/AT) distillation is on."""
        cfg, spec, train = self.cfg, splits.spec, splits.train
        if cfg.batch_size * self.world > len(train):
            raise InputError(f"batch size {cfg.batch_size} x {self.world} process(es) is larger than the training split ({len(train)} samples)")
        if teachers:
            n_s = _n_outputs(student, spec, "student")
            for k, t in enumerate(teachers):
                who = "teacher" if len(teachers) == 1 else f"teacher {k + 1}"
                n_t = _n_outputs(t, spec, who)
                if n_t != n_s:
                    raise InputError(f"{who} has {n_t} outputs but the student has {n_s}: they must predict the same classes")
            if n_s != len(spec.classes):
                raise InputError(f"the student and teacher have {n_s} outputs but the data has {len(spec.classes)} classes")
        use_features = bool(teachers) and (cfg.loss.uses_features or any(self._transformer_weights(student, teachers)))
        if use_features and not isinstance(teachers[0], nn.Module):
            raise InputError("hint / attention-transfer losses need an eager PyTorch teacher (forward hooks)")
        return use_features

    def _transformer_weights(self, student: nn.Module, teachers: list[Any]) -> tuple[float, float]:
        """(hidden-state, attention-map) loss weights; unset ones are on when student and teacher are both ViTs."""
        from kdtoolkit.student.transformer import is_transformer

        pair = len(teachers) == 1 and isinstance(teachers[0], nn.Module) and is_transformer(student) and is_transformer(teachers[0])
        return self.cfg.loss.transformer_weights(pair)

    def _loss_fn(self, teachers: list[Any]) -> Any:
        """The registered loss, or multi-teacher KD when several teachers are given."""
        cfg = self.cfg
        if len(teachers) > 1 and cfg.loss.name in ("kd", "multi_kd"):
            from functools import partial

            from kdtoolkit.distill.losses import multi_teacher_kd_loss

            return partial(multi_teacher_kd_loss, weighting=cfg.loss.teacher_weighting, weights=cfg.loss.teacher_weights)
        return LOSSES.get(cfg.loss.name)

    def _distill_token(self, student: nn.Module, teachers: list[Any], on: bool) -> bool:
        """DeiT: a student with a distillation token (timm's ``VisionTransformerDistilled``) returns its class and
        distillation heads apart while it trains with a teacher; returns whether that is the case."""
        if not teachers or not callable(getattr(student, "set_distilled_training", None)):
            return False
        student.set_distilled_training(on)  # type: ignore[operator]
        if on:
            log(f"DeiT distillation token: the distillation head learns the teacher ({self.cfg.loss.distill_token}), the class "
                "head the labels; they are averaged at inference", enabled=self.progress and self.is_main)
        return True

    def _logit_loss(self, loss_fn: Any, out: Any, t_logits: torch.Tensor | None, target: torch.Tensor, alpha: float,
                    temp: float) -> torch.Tensor:
        """The configured logit loss, or DeiT's two-head loss when the student returns (class, distillation) logits."""
        ls = self.cfg.loss.label_smoothing
        if isinstance(out, tuple):
            return distillation_token_loss(out[0].float(), out[1].float(), t_logits, target, mode=self.cfg.loss.distill_token,
                                           alpha=alpha, temperature=temp, label_smoothing=ls)
        return loss_fn(out.float(), t_logits, target, alpha=alpha, temperature=temp, label_smoothing=ls)

    def _device(self) -> tuple[torch.device, torch.memory_format]:
        device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() and os.environ.get("KDTOOLKIT_CPU") != "1" else "cpu")
        return device, torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def _place(self, student: nn.Module, teachers: list[Any], device: torch.device, fmt: torch.memory_format) -> nn.Module:
        """Move the models to the device (teachers frozen, in eval mode); under DDP start the process group and
        convert BatchNorm to its synchronised form. Returns the student to train."""
        student.to(device, memory_format=fmt)
        for t in teachers:
            if isinstance(t, nn.Module):
                t.to(device).eval()
                for p in t.parameters():
                    p.requires_grad_(False)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            if self.cfg.sync_bn:
                if device.type == "cuda":
                    student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
                else:  # torch's SyncBatchNorm is GPU-only
                    from kdtoolkit.distill.syncbn import convert_gloo_sync_bn

                    student = convert_gloo_sync_bn(student)
        return student

    def _features(self, raw: nn.Module, teachers: list[Any], spec: DataSpec, device: torch.device) -> tuple[Any, Any, int, nn.Module]:
        """Feature distillation: hooks on paired modules, adapters trained with the student (never saved with it).
        Returns (adapters, teacher taps, number of hint pairs, the module the loop runs)."""
        from kdtoolkit.distill.losses import DistillWrapper, FeatureTaps, HintAdapter, probe_feature_maps, resolve_pairs

        cfg = self.cfg
        shape = (spec.channels, *spec.input_size)
        hint_pairs = resolve_pairs(raw, teachers[0], shape, cfg.loss.hints) if cfg.loss.hint_weight > 0 else []
        at_pairs = resolve_pairs(raw, teachers[0], shape, cfg.loss.at_layers) if cfg.loss.at_weight > 0 else []
        s_ch = {n: c[0] for n, c in probe_feature_maps(raw, shape)}
        t_ch = {n: c[0] for n, c in probe_feature_maps(teachers[0], shape)}
        adapters = nn.ModuleList([HintAdapter(s_ch[s], t_ch[t]) for s, t in hint_pairs]).to(device)
        s_taps = FeatureTaps(raw, [s for s, _ in hint_pairs + at_pairs])
        t_taps = FeatureTaps(teachers[0], [t for _, t in hint_pairs + at_pairs])
        core = DistillWrapper(raw, s_taps, adapters, len(hint_pairs))
        hidden_w, attn_w = self._transformer_weights(raw, teachers)
        tkd = None
        if hidden_w or attn_w:  # ViT pair: hidden states and attention maps, TinyBERT's layer map
            from kdtoolkit.distill.losses import TransformerKD

            tkd = TransformerKD(raw, teachers[0], hidden_w, attn_w).to(device)
            adapters.extend(tkd.proj)  # trained and checkpointed with the hint adapters; never part of the student
            log(f"transformer distillation: student blocks <- teacher blocks {tkd.pairs} (hidden x{hidden_w:g}, "
                f"attention x{attn_w:g})", enabled=self.progress and self.is_main)
        if hint_pairs or at_pairs:
            log(f"feature distillation pairs (student -> teacher): hints {hint_pairs or '-'}, AT {at_pairs or '-'}",
                enabled=self.progress and self.is_main)
        core.transformer_kd = tkd  # type: ignore[assignment]
        return adapters, t_taps, len(hint_pairs), core

    def _optimizer(self, raw: nn.Module, extra: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
        """SGD (Nesterov) or AdamW over the parameter groups (per-prefix lr scales); returns it and the parameters."""
        cfg = self.cfg
        groups = param_groups(raw, cfg, extra)
        params = [p for g in groups for p in g["params"]]
        if cfg.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        for g in opt.param_groups:
            g["base_lr"] = cfg.lr * g.get("lr_scale", 1.0)
        return opt, params

    def _teacher_caches(self, teachers: list[Any], train: ArrayData, spec: DataSpec, use_features: bool) -> list[TeacherCache]:
        """Teacher logits cached on disk when every epoch sees the same inputs (no augmentation, mixup, cutmix or features)."""
        cfg = self.cfg
        kd_on = cfg.loss.alpha.start > 0 or (cfg.loss.alpha.end or 0) > 0
        use_cache = bool(teachers) and kd_on and cfg.cache_teacher and cfg.augment == "none" and not cfg.mixup and not cfg.cutmix and not use_features
        if not use_cache:
            return []
        paths = [self.work_dir / ("teacher_logits.npy" if k == 0 else f"teacher{k}_logits.npy") for k in range(len(teachers))]
        if self.world > 1:  # rank 0 fills the cache; the others wait and map the same files
            import torch.distributed as dist

            if self.is_main:
                for t, p in zip(teachers, paths):
                    TeacherCache(t, train, spec, p)
            dist.barrier()
        return [TeacherCache(t, train, spec, p) for t, p in zip(teachers, paths)]

    def _view_bank(self, teachers: list[Any], train: ArrayData, spec: DataSpec, use_features: bool) -> ViewBank | None:
        """The teacher view bank when augmentation is on and ``augment_views`` asks for one (one teacher, logits only)."""
        cfg = self.cfg
        if not cfg.augment_views or cfg.augment == "none" or not teachers:
            return None
        if len(teachers) > 1 or use_features or cfg.mixup or cfg.cutmix:
            raise InputError("augment_views stores one teacher's logits for crop/flip views: it does not combine with several "
                             "teachers, hint/attention losses, mixup or cutmix")
        path = self.work_dir / f"teacher_views_{cfg.augment}_{cfg.augment_views}_s{cfg.seed}.npy"
        make = lambda: ViewBank(teachers[0], train, spec, path, views=cfg.augment_views, mode=cfg.augment, seed=cfg.seed,  # noqa: E731
                                progress=self.progress and self.is_main)
        if self.world > 1:  # rank 0 fills the bank; the others wait and map the same file
            import torch.distributed as dist

            if self.is_main:
                make()
            dist.barrier()
        return make()

    def _fit_to_budget(self, step: int, elapsed: float, probed: int, n_val: int, steps_per_epoch: int, cap: int) -> int:
        """The step count that ends training within ``time_budget_min``, from the probed steps' time.

        Validation runs once per epoch; it is costed as a forward pass per validation image at a third of a
        training step's time per image (no backward), a deliberate overestimate."""
        cfg = self.cfg
        per_step = elapsed / max(probed, 1)
        val_per_epoch = per_step / 3 * n_val / max(cfg.batch_size, 1)
        per_step_all = per_step + val_per_epoch / max(steps_per_epoch, 1)
        fitted = max(step + 1, int(cfg.time_budget_min * 60 / per_step_all))
        fitted = min(fitted, cap)
        log(f"time budget {cfg.time_budget_min:g} min: {per_step:.3f} s a step measured over {probed} steps -> {fitted} steps "
            f"(~{fitted / max(steps_per_epoch, 1):.1f} epochs)", enabled=self.progress and self.is_main)
        return fitted

    @staticmethod
    def _eta(elapsed: float, done: int, left: int) -> float | None:
        """Seconds left at this run's pace so far (training and validation together)."""
        return elapsed / done * left if done > 0 and left > 0 else None

    # -- training -----------------------------------------------------------------------------
    def fit(self, student: nn.Module, splits: Splits, teacher: Any = None) -> dict[str, Any]:
        """Train; ``teacher`` is None, one model, or a list of models (multi-teacher KD)."""
        cfg = self.cfg
        spec = splits.spec
        train = splits.train
        teachers: list[Any] = [] if teacher is None else list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        if cfg.loss.name == "ce" and not cfg.loss.uses_features:
            teachers = []  # labels alone: a teacher handed in is never run (no logit cache, no view bank)
        use_features = self._check_inputs(student, teachers, splits)
        loss_fn = self._loss_fn(teachers)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        device, fmt = self._device()
        raw: nn.Module = self._place(student, teachers, device, fmt)
        token = self._distill_token(raw, teachers, True)
        # feature distillation: hooks on paired modules, adapters trained with the student (never saved with it)
        adapters, t_taps, n_hint, core = self._features(raw, teachers, spec, device) if use_features else (None, None, 0, raw)
        extra = list(adapters.parameters()) if adapters is not None else []
        opt, params = self._optimizer(raw, extra)
        ema = copy.deepcopy(raw).eval() if cfg.ema_decay else None
        scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None

        def wrap() -> nn.Module:
            if self.world > 1:
                return nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
            return core

        steps_per_epoch = len(train) // (cfg.batch_size * self.world)
        total = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        caches = self._teacher_caches(teachers, train, spec, use_features)
        bank = self._view_bank(teachers, train, spec, use_features)

        budget_probe = 0  # with time_budget_min: steps timed before the schedule is fitted to the budget
        if cfg.time_budget_min:
            total = 10**9 if not cfg.max_steps else cfg.max_steps  # the budget, not the epoch count, ends the run
            budget_probe = min(20, max(2, steps_per_epoch // 4))
        state = self._load()
        if state is not None and state.get("total"):
            total, budget_probe = state["total"], 0  # a resumed run keeps the schedule it fitted
        step, epoch, batch_in_epoch = 0, 0, 0
        history: list[dict[str, Any]] = []
        best = {"val_accuracy": -1.0, "epoch": -1}
        bad_epochs = 0
        mix_gen = torch.Generator().manual_seed(cfg.seed + 17)
        if state is not None:
            raw.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            if adapters is not None and state.get("adapters") is not None:
                adapters.load_state_dict(state["adapters"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            history, best, bad_epochs = state["history"], state["best"], state["bad_epochs"]
            torch.set_rng_state(state["torch_rng"])
            mix_gen.set_state(state["mix_rng"])
            log(f"resuming from {self._ckpt_path()} at epoch {epoch + 1}, step {step}", enabled=self.is_main and self.progress)

        def snapshot(done_epoch: bool) -> dict[str, Any]:
            return {
                "model": raw.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "adapters": adapters.state_dict() if adapters is not None else None,
                "step": step, "epoch": epoch + (1 if done_epoch else 0), "batch_in_epoch": 0 if done_epoch else batch_in_epoch,
                "history": history, "best": best, "bad_epochs": bad_epochs,
                "torch_rng": torch.get_rng_state(), "mix_rng": mix_gen.get_state(), "total": total,
            }

        metrics_log = self.work_dir / "metrics.jsonl"
        if state is None and self.is_main and metrics_log.exists():
            metrics_log.unlink()  # a fresh run: no lines from an abandoned one
        tb = self._tb_writer()
        frozen_now: list[str] | None = None
        model = wrap() if not cfg.freeze else core
        stop = False
        t_start, step_start = time.perf_counter(), step
        max_epochs = cfg.epochs if not cfg.time_budget_min else 10**9
        while epoch < max_epochs and step < total and not stop:
            model.train()
            if cfg.freeze:
                frozen = apply_freeze(raw, cfg, epoch)
                if frozen != frozen_now:
                    if frozen_now is not None:
                        log(f"epoch {epoch + 1}: frozen now: {', '.join(frozen) or 'nothing'}", enabled=self.progress and self.is_main)
                    frozen_now = frozen
                    model = wrap()  # DDP only syncs parameters that need grad when it is built
                    model.train()
                    apply_freeze(raw, cfg, epoch)
            for t in teachers:
                if isinstance(t, nn.Module):
                    t.eval()
            it = batches(train, spec, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, augment="none" if bank else cfg.augment,
                         drop_last=True, rank=self.rank, world_size=self.world, with_index=True, start_batch=batch_in_epoch)
            run_loss, run_n, t_epoch, cpu_epoch = 0.0, 0, time.perf_counter(), time.process_time()
            n_epoch_steps = 0
            of = cfg.epochs if not cfg.time_budget_min else -(-total // max(steps_per_epoch, 1)) if total < 10**9 else "?"
            with Progress(f"epoch {epoch + 1}/{of}", steps_per_epoch, enabled=self.progress and self.is_main) as bar:
                if batch_in_epoch:
                    bar.advance(batch_in_epoch)
                for x, y, idx in it:
                    if step >= total:
                        break
                    if bank is not None:  # this epoch's stored view of each image, its crop and flip replayed
                        views = bank.view_of(idx, epoch)
                        x = bank.augment(x, idx, views)
                    x, y = x.to(device, non_blocking=True, memory_format=fmt if x.dim() == 4 else torch.preserve_format), y.to(device)
                    progress_t = step / max(1, total)
                    alpha = cfg.loss.alpha.at(progress_t)
                    temp = cfg.loss.temperature.at(progress_t)
                    xm, target = _mix(x, y, len(spec.classes), cfg, mix_gen) if (cfg.mixup or cfg.cutmix) else (x, y)
                    t_logits = None
                    if teachers and (alpha > 0 or use_features):
                        if bank is not None:
                            outs = [bank(idx, views).to(device)]
                        elif caches:
                            outs = [c(idx).to(device) for c in caches]
                        else:
                            with torch.no_grad():
                                outs = [t(xm).float() for t in teachers]
                        t_logits = outs[0] if len(outs) == 1 else torch.stack(outs)
                    factor = lr_factor(step, total, cfg.warmup_steps, cfg.schedule)
                    for g in opt.param_groups:
                        g["lr"] = g["base_lr"] * factor
                    with torch.autocast(device.type, enabled=scaler is not None):
                        if use_features:
                            from kdtoolkit.distill.losses import FEATURE_LOSSES

                            out, hinted, at_s = model(xm)
                            t_feats = t_taps.get()
                            loss = self._logit_loss(loss_fn, out, t_logits if alpha > 0 else None, target, alpha, temp)
                            if n_hint:
                                loss = loss + cfg.loss.hint_weight * FEATURE_LOSSES.get("hint")(
                                    [h.float() for h in hinted], [f.float() for f in t_feats[:n_hint]])
                            if cfg.loss.at_weight > 0:
                                loss = loss + cfg.loss.at_weight * FEATURE_LOSSES.get("at")(
                                    [f.float() for f in at_s], [f.float() for f in t_feats[n_hint:]])
                            if core.transformer_kd is not None:  # type: ignore[union-attr]
                                loss = loss + core.transformer_kd.loss()  # type: ignore[union-attr]
                        else:
                            out = model(xm)
                            loss = self._logit_loss(loss_fn, out, t_logits, target, alpha, temp)
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; the last good checkpoint is kept at "
                            f"{self._ckpt_path()} (lower the learning rate, or enable --grad-clip)"
                        )
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(opt)
                    else:
                        loss.backward()
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    if ema is not None:
                        with torch.no_grad():
                            for pe, pm in zip(ema.state_dict().values(), raw.state_dict().values()):
                                if pe.dtype.is_floating_point:
                                    pe.mul_(cfg.ema_decay).add_(pm.detach(), alpha=1 - cfg.ema_decay)
                                else:
                                    pe.copy_(pm)
                    step += 1
                    batch_in_epoch += 1
                    n_epoch_steps += 1
                    run_loss += loss.item() * len(y)
                    run_n += len(y)
                    bar.advance(1, loss=run_loss / run_n, lr=opt.param_groups[0]["lr"])
                    if budget_probe and step - step_start == budget_probe:
                        total = self._fit_to_budget(step, time.perf_counter() - t_start, budget_probe, len(splits.val),
                                                    steps_per_epoch, total)
                        budget_probe = 0
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                        self._save(snapshot(False))
            dt = time.perf_counter() - t_epoch  # training only: validation is timed apart
            cpu_dt = time.process_time() - cpu_epoch  # CPU seconds: steadier than wall time on a shared machine
            eval_model = ema if ema is not None else raw
            t_val = time.perf_counter()
            val = self.evaluate(eval_model, splits.val, spec) if len(splits.val) else {"accuracy": float("nan")}
            rec = {"epoch": epoch + 1, "step": step, "train_loss": run_loss / max(run_n, 1), "val_accuracy": val["accuracy"],
                   "epoch_time_s": dt, "steps_per_s": n_epoch_steps / max(dt, 1e-9), "epoch_cpu_s": cpu_dt, "val_time_s": time.perf_counter() - t_val}
            history.append(rec)
            if self.is_main:
                with open(metrics_log, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                if tb is not None:
                    for k in ("train_loss", "val_accuracy", "epoch_time_s"):
                        tb.add_scalar(k, rec[k], epoch + 1)
                    tb.flush()
                rec["eta_s"] = self._eta(time.perf_counter() - t_start, step - step_start, total - step)
                log(f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f}, val top-1 {100 * rec['val_accuracy']:.2f} %"
                    + (f", {_clock(rec['eta_s'])}" if rec["eta_s"] else ""), enabled=self.progress)
            improved = val["accuracy"] > best["val_accuracy"]
            if improved:
                best = {"val_accuracy": val["accuracy"], "epoch": epoch + 1}
                bad_epochs = 0
                if self.is_main:
                    fsutil.torch_save(eval_model.state_dict(), self.work_dir / "best.pt")
            else:
                bad_epochs += 1
            if cfg.patience and bad_epochs >= cfg.patience:
                log(f"early stopping: no val improvement for {bad_epochs} epoch(s)", enabled=self.progress and self.is_main)
                stop = True
            self._save(snapshot(True))
            epoch += 1
            batch_in_epoch = 0
        if tb is not None:
            tb.close()
        if t_taps is not None:
            t_taps.remove()
            core._taps.remove()  # type: ignore[union-attr]
            if core.transformer_kd is not None:  # type: ignore[union-attr]
                core.transformer_kd.remove()  # type: ignore[union-attr]
        if cfg.freeze:
            for p in raw.parameters():
                p.requires_grad_(True)
        if token:  # both heads averaged again: what validation saw and what exports
            self._distill_token(raw, teachers, False)
            if ema is not None:
                self._distill_token(ema, teachers, False)
        # the returned model is the best on validation (the test split is never looked at here)
        best_path = self.work_dir / "best.pt"
        final = ema if ema is not None else raw
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0 has finished writing best.pt
        if best_path.exists():
            final.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
        final.to("cpu", memory_format=torch.contiguous_format).eval()
        return {"model": final, "history": history, "best": best, "steps": step, "train_time_s": time.perf_counter() - t_start}

    @staticmethod
    def evaluate(model: nn.Module, data: ArrayData, spec: DataSpec, batch_size: int = 512) -> dict[str, Any]:
        from kdtoolkit.evaluate import evaluate

        device = next(model.parameters()).device
        was = model.training
        model.eval()
        if device.type == "cpu":
            r = evaluate(model, data, spec, batch_size=batch_size)
        else:
            correct = 0
            with torch.no_grad():
                for x, y in batches(data, spec, batch_size):
                    correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            r = {"accuracy": correct / max(len(data), 1)}
        model.train(was)
        return r
