"""Distillation losses, each registered by name and citing its paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdtoolkit.registry import Registry

LOSSES: Registry = Registry("loss")


@LOSSES.register("kd")
def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network".

    alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y). The T^2 factor keeps
    the soft-target gradients on the same scale as the hard-label ones when T changes.
    ``labels`` may be class indices or soft targets (mixup/cutmix).
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True
    )
    return alpha * t * t * kl + (1 - alpha) * ce


@LOSSES.register("ce")
def ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *, label_smoothing: float = 0.0, **_: float) -> torch.Tensor:
    """Plain cross-entropy on labels (training without a teacher, and fine-tuning)."""
    return F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
