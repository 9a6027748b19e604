"""Distillation losses, each registered by name and citing its paper.

``LOSSES`` holds the logit losses the trainer calls as ``fn(student_logits, teacher_logits, labels,
alpha=, temperature=, label_smoothing=)``; ``FEATURE_LOSSES`` holds the losses on intermediate
features (FitNets hints, attention transfer), which the trainer adds on top when enabled.
Golden values for every loss are in tests/test_losses.py, computed independently with numpy.
"""

from __future__ import annotations

import difflib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.registry import Registry

LOSSES: Registry = Registry("loss")
FEATURE_LOSSES: Registry = Registry("feature loss")


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
    ``labels`` may be class indices or soft targets (mixup/cutmix). ``teacher_logits`` may be a
    stack of several teachers' logits (K, N, C): they are averaged (equal fixed weights).
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0:
        return ce
    if teacher_logits.dim() == 3:
        return multi_teacher_kd_loss(student_logits, teacher_logits, labels, alpha=alpha, temperature=temperature,
                                     label_smoothing=label_smoothing)
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True
    )
    return alpha * t * t * kl + (1 - alpha) * ce


@LOSSES.register("ce")
def ce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *, label_smoothing: float = 0.0, **_: float) -> torch.Tensor:
    """Plain cross-entropy on labels (training without a teacher, and fine-tuning)."""
    return F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)


def _hard(labels: torch.Tensor) -> torch.Tensor:
    """Class indices from indices or soft targets (mixup/cutmix): the largest share is the target class."""
    return labels.argmax(1) if labels.dim() == 2 else labels


def distillation_token_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    mode: Literal["hard", "soft"] = "hard",
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention" (DeiT).

    A student with a distillation token has two heads: the class head learns the labels, the distillation head
    learns the teacher. ``hard`` (the paper's better variant): 1/2 CE(cls, y) + 1/2 CE(dist, argmax teacher).
    ``soft``: (1 - alpha) CE(cls, y) + alpha T^2 KL(softmax(t/T) || softmax(dist/T)). Without teacher logits
    (alpha scheduled to 0) both heads learn the labels. At inference the heads are averaged (timm's
    ``VisionTransformerDistilled`` in eval mode), so the exported model has one output.
    """
    ce_cls = F.cross_entropy(cls_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return 0.5 * ce_cls + 0.5 * F.cross_entropy(dist_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits.dim() == 3:  # several teachers: their mean
        teacher_logits = teacher_logits.mean(0)
    if mode == "hard":
        return 0.5 * ce_cls + 0.5 * F.cross_entropy(dist_logits, teacher_logits.argmax(1))
    kl = F.kl_div(F.log_softmax(dist_logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                  reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - alpha) * ce_cls + alpha * kl


@LOSSES.register("dkd")
def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
) -> torch.Tensor:
    """Zhao, Cui, Song, Qiu, Liang 2022, "Decoupled Knowledge Distillation" (CVPR).

    KD split into target-class KD (TCKD: KL of the binary [p_target, 1 - p_target]) and non-target-class KD
    (NCKD: KL of the distributions over the other classes), re-weighted so the non-target "dark knowledge"
    is not suppressed when the teacher is confident: alpha * T^2 * (tckd_weight * TCKD + nckd_weight *
    NCKD) + (1 - alpha) * CE. Weights 1 and 8 are the paper's CIFAR-100 setting (alpha=1, beta=8, T=4); the
    paper also warms the DKD term up over 20 epochs, which the alpha schedule provides.
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0:
        return ce
    t = temperature
    gt = F.one_hot(_hard(labels), student_logits.shape[1]).bool()
    p_s, p_t = F.softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0).sum(1)], 1).clamp_min(1e-12)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0).sum(1)], 1).clamp_min(1e-12)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean()
    # non-target distributions: the target logit pushed to -inf-like before the softmax (the paper's -1000)
    ls_nt = F.log_softmax(student_logits / t - 1000.0 * gt, dim=1)
    lt_nt = F.log_softmax(teacher_logits / t - 1000.0 * gt, dim=1)
    nckd = F.kl_div(ls_nt, lt_nt, reduction="batchmean", log_target=True)
    return alpha * t * t * (tckd_weight * tckd + nckd_weight * nckd) + (1 - alpha) * ce


def _pearson_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - Pearson correlation between the rows of ``a`` and ``b``."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-8)).mean()


@LOSSES.register("dist")
def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
) -> torch.Tensor:
    """Huang, You, Wang, Qian, Xu 2022, "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS).

    Matches relations instead of exact probabilities, which tolerates a large teacher-student gap: the
    inter-class relation (1 - Pearson correlation of each sample's class probabilities) and the intra-class
    relation (1 - Pearson correlation of each class's probabilities across the batch), both at temperature
    T: alpha * T^2 * (inter_weight * inter + intra_weight * intra) + (1 - alpha) * CE. The paper's weights are 1 and 1.
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0:
        return ce
    t = temperature
    y_s, y_t = F.softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1)
    inter = _pearson_gap(y_s, y_t)
    intra = _pearson_gap(y_s.t(), y_t.t())
    return alpha * t * t * (inter_weight * inter + intra_weight * intra) + (1 - alpha) * ce


# -- multi-teacher -------------------------------------------------------------------------------
def teacher_weights(
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    mode: Literal["fixed", "confidence", "ce"] = "fixed",
    fixed: list[float] | None = None,
) -> torch.Tensor:
    """Per-sample teacher weights (K, N) that sum to 1 over the K teachers.

    * ``fixed``: the given weights (normalised), the same for every sample (equal if none given);
    * ``confidence``: proportional to each teacher's max softmax probability on the sample;
    * ``ce``: softmax over teachers of minus their cross-entropy on the label, so a teacher that is
      right and sure counts more (the idea of CA-MKD, Zhang et al. 2022, "Confidence-Aware
      Multi-Teacher Knowledge Distillation").
    """
    k, n, _ = teacher_logits.shape
    if mode == "fixed":
        w = torch.tensor(fixed if fixed else [1.0] * k, dtype=teacher_logits.dtype, device=teacher_logits.device)
        if w.numel() != k:
            from kdtoolkit.errors import InputError

            raise InputError(f"{w.numel()} teacher weights given for {k} teachers")
        return (w / w.sum())[:, None].expand(k, n)
    with torch.no_grad():
        if mode == "confidence":
            conf = teacher_logits.softmax(-1).amax(-1)
            return conf / conf.sum(0, keepdim=True)
        if labels.dim() == 2:  # soft targets (mixup): CE against them
            ce = -(labels[None] * teacher_logits.log_softmax(-1)).sum(-1)
        else:
            ce = -teacher_logits.log_softmax(-1).gather(-1, labels[None, :, None].expand(k, n, 1)).squeeze(-1)
        return (-ce).softmax(0)


@LOSSES.register("multi_kd")
def multi_teacher_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
    weighting: Literal["fixed", "confidence", "ce"] = "fixed",
    weights: list[float] | None = None,
) -> torch.Tensor:
    """Multi-teacher KD: Hinton's loss with the soft-target term a per-sample weighted sum over teachers.

    You, Xu, Xu, Tao 2017, "Learning from Multiple Teacher Networks" (fixed weights); per-sample
    confidence weighting as in CA-MKD (Zhang, Chen, Wang 2022). ``teacher_logits`` is (K, N, C).
    loss = alpha * T^2 * mean_i sum_k w_ki KL(softmax(t_ki/T) || softmax(s_i/T)) + (1 - alpha) CE.
    """
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None or alpha == 0:
        return ce
    if teacher_logits.dim() == 2:
        teacher_logits = teacher_logits[None]
    t = temperature
    w = teacher_weights(teacher_logits, labels, weighting, weights)  # K, N
    log_s = F.log_softmax(student_logits / t, dim=1)[None]  # 1, N, C
    log_t = F.log_softmax(teacher_logits / t, dim=-1)  # K, N, C
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # K, N
    return alpha * t * t * (w * kl).sum(0).mean() + (1 - alpha) * ce


# -- feature losses ------------------------------------------------------------------------------
def _match_size(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Pool/resize the student map to the teacher's spatial size (pairs named by hand may differ)."""
    if s.shape[-2:] == t.shape[-2:]:
        return s
    if s.shape[-2] >= t.shape[-2] and s.shape[-1] >= t.shape[-1]:
        return F.adaptive_avg_pool2d(s, t.shape[-2:])
    return F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)


@FEATURE_LOSSES.register("hint")
def hint_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> torch.Tensor:
    """FitNets (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets"): mean squared error between the
    adapted student feature (1x1 conv + BN regressor, see :class:`HintAdapter`) and the teacher's
    feature, averaged over pairs."""
    total = student_feats[0].new_zeros(())
    for s, t in zip(student_feats, teacher_feats):
        total = total + F.mse_loss(_match_size(s, t), t.detach())
    return total / max(len(student_feats), 1)


def attention_map(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention of a feature map: mean over channels of |x|^p, flattened, L2-normalised."""
    return F.normalize(x.abs().pow(p).mean(1).flatten(1), dim=1)


@FEATURE_LOSSES.register("at")
def attention_transfer_loss(student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], p: int = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

    Sum over pairs of mean_{i,j} (Q_s - Q_t)^2 with Q = normalise(mean_c |A|^p), as in the paper's
    reference code (channel counts may differ; no adapter needed)."""
    total = student_feats[0].new_zeros(())
    for s, t in zip(student_feats, teacher_feats):
        total = total + (attention_map(_match_size(s, t), p) - attention_map(t.detach(), p)).pow(2).mean()
    return total


class HintAdapter(nn.Module):
    """1x1 conv + BN from the student's channels to the teacher's (the FitNets regressor).

    Trained with the student and thrown away afterwards: never part of the saved student."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


# -- taps: stage outputs through forward hooks ---------------------------------------------------
def probe_feature_maps(model: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, C,H,W) of every submodule with a 4-D output, in the order their forward calls finish."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                seen.append((name, tuple(out.shape[1:])))

        hooks.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(1, *shape, device=p.device if p is not None else "cpu"))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen


def stage_outputs(model: nn.Module, shape: tuple[int, ...]) -> dict[tuple[int, int], tuple[str, int]]:
    """The last module (in finishing order) producing each spatial size: the stage outputs.

    For a CIFAR ResNet that is layer1/layer2/layer3; a container finishes after its children, so
    the whole stage is chosen rather than its last ReLU."""
    out: dict[tuple[int, int], tuple[str, int]] = {}
    for name, (c, h, w) in probe_feature_maps(model, shape):
        out[(h, w)] = (name, c)
    return out


def auto_pairs(student: nn.Module, teacher: nn.Module, shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """Pair student and teacher stage outputs by spatial size (sizes both have), largest size first."""
    s, t = stage_outputs(student, shape), stage_outputs(teacher, shape)
    common = sorted(set(s) & set(t), key=lambda hw: -hw[0] * hw[1])
    return [(s[hw][0], t[hw][0]) for hw in common]


def resolve_pairs(
    student: nn.Module, teacher: nn.Module, shape: tuple[int, ...], hints: list[str] | None
) -> list[tuple[str, str]]:
    """Student/teacher module pairs: automatic when ``hints`` is empty, else "student[:teacher]" names.

    A student name without a teacher name is paired with the teacher's stage output of the same
    spatial size. Unknown names are one-line InputErrors that list close names."""
    from kdtoolkit.errors import InputError

    if not hints:
        pairs = auto_pairs(student, teacher, shape)
        if not pairs:
            raise InputError("no student and teacher feature maps share a spatial size; name the hint layers (student:teacher)")
        return pairs
    s_maps = {n: shp for n, shp in probe_feature_maps(student, shape)}
    t_maps = {n: shp for n, shp in probe_feature_maps(teacher, shape)}
    s_names = dict(student.named_modules())
    t_names = dict(teacher.named_modules())
    t_stages = stage_outputs(teacher, shape)
    pairs = []
    for h in hints:
        sn, _, tn = h.partition(":")
        for who, name, names, maps in (("student", sn, s_names, s_maps), ("teacher", tn, t_names, t_maps)):
            if who == "teacher" and not tn:
                continue
            if name not in names:
                close = difflib.get_close_matches(name, [n for n in names if n], n=5, cutoff=0.4) or [n for n in maps][:5]
                raise InputError(f"hint layer {name!r} does not exist in the {who}; close names: {', '.join(close)}")
            if name not in maps:
                raise InputError(f"hint layer {name!r} of the {who} has no 4-D feature-map output; pick one of: {', '.join(list(maps)[:8])}")
        if not tn:
            hw = s_maps[sn][1:]
            if tuple(hw) not in t_stages:
                raise InputError(f"hint layer {sn!r} outputs {hw[0]}x{hw[1]} but no teacher stage does; name it as {sn}:TEACHER_LAYER")
            tn = t_stages[tuple(hw)][0]
        pairs.append((sn, tn))
    return pairs


class FeatureTaps:
    """Forward hooks that keep the outputs of named modules from the latest forward call."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names = names
        self.feats: dict[str, torch.Tensor] = {}
        mods = dict(model.named_modules())
        self._hooks = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            self.feats[name] = out

        return fn

    def get(self) -> list[torch.Tensor]:
        return [self.feats[n] for n in self.names]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class DistillWrapper(nn.Module):
    """Student plus hint adapters as one module, so DDP syncs the adapters' gradients too.

    forward(x) -> (logits, adapted features of the first ``n_hint`` taps, raw features of the rest (AT))."""

    def __init__(self, student: nn.Module, taps: FeatureTaps, adapters: nn.ModuleList | None, n_hint: int = 0) -> None:
        super().__init__()
        self.student = student
        self.adapters = adapters if adapters is not None else nn.ModuleList()
        self._taps = taps
        self.n_hint = n_hint

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        logits = self.student(x)
        feats = self._taps.get()
        hinted = [a(f) for a, f in zip(self.adapters, feats[: self.n_hint])]
        return logits, hinted, feats[self.n_hint:]


# -- transformer students: hidden states and attention maps -------------------------------------
@FEATURE_LOSSES.register("hidden")
def hidden_state_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor]) -> torch.Tensor:
    """TinyBERT (Jiao et al. 2020) hidden-state loss: MSE between the (projected, when widths differ) student
    block output and its mapped teacher block output, averaged over pairs."""
    total = student_hidden[0].new_zeros(())
    for s, t in zip(student_hidden, teacher_hidden):
        total = total + F.mse_loss(s, t.detach())
    return total / max(len(student_hidden), 1)


def attention_log_probs(qkv: torch.Tensor, attn: nn.Module, relation_heads: int | None = None) -> torch.Tensor:
    """Log attention probabilities (B, R, N, N) recomputed from a timm attention's fused qkv output.

    timm runs attention through fused SDPA, which never materialises the map, so it is rebuilt from q and k
    (after the module's q/k norms) with the module's own scale. With ``relation_heads`` R different from the
    module's head count, the concatenated q and k are re-split into R heads (MiniLMv2's relation heads), so
    a student with fewer heads can still be compared with its teacher."""
    b, n, _ = qkv.shape
    h, d = int(attn.num_heads), int(attn.head_dim)
    q, k, _v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    r = relation_heads or h
    if r != h:
        q = q.transpose(1, 2).reshape(b, n, r, h * d // r).transpose(1, 2)
        k = k.transpose(1, 2).reshape(b, n, r, h * d // r).transpose(1, 2)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return scores.float().log_softmax(-1)


@FEATURE_LOSSES.register("attn")
def attention_map_loss(student_logp: list[torch.Tensor], teacher_logp: list[torch.Tensor]) -> torch.Tensor:
    """MiniLM (Wang et al. 2020) self-attention distribution transfer: KL(teacher || student) over the keys,
    averaged over batch, heads and queries, then over pairs. Zero exactly when the maps are equal."""
    total = student_logp[0].new_zeros(())
    for s, t in zip(student_logp, teacher_logp):
        t = t.detach()
        total = total + (t.exp() * (t - s)).sum(-1).mean()
    return total / max(len(student_logp), 1)


class TransformerTaps:
    """Hooks on chosen blocks of a ViT: each block's output and its attention's fused qkv output."""

    def __init__(self, model: nn.Module, blocks: list[int]) -> None:
        self.blocks = [model.blocks[i] for i in blocks]
        self.hidden: dict[int, torch.Tensor] = {}
        self.qkv: dict[int, torch.Tensor] = {}
        self._hooks = []
        for j, b in enumerate(self.blocks):
            self._hooks.append(b.register_forward_hook(lambda _m, _i, out, j=j: self.hidden.__setitem__(j, out)))
            self._hooks.append(b.attn.qkv.register_forward_hook(lambda _m, _i, out, j=j: self.qkv.__setitem__(j, out)))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class TransformerKD(nn.Module):
    """Hidden-state and attention-map distillation of a ViT student from a ViT teacher, on top of logit KD.

    Student block i is paired with teacher block (i+1)*T/S - 1 (TinyBERT's uniform map). The projections
    (a linear map per pair when the embedding widths differ) train with the student and are never part of it,
    so they are gone at export."""

    def __init__(self, student: nn.Module, teacher: nn.Module, hidden_weight: float, attn_weight: float) -> None:
        super().__init__()
        from kdtoolkit.student.transformer import layer_map

        s_n, t_n = len(student.blocks), len(teacher.blocks)
        self.pairs = layer_map(s_n, t_n)
        self.hidden_weight, self.attn_weight = hidden_weight, attn_weight
        self.s = TransformerTaps(student, list(range(s_n)))
        self.t = TransformerTaps(teacher, self.pairs)
        self.proj = nn.ModuleList()
        self.relation_heads = []
        for sb, tb in zip(self.s.blocks, self.t.blocks):
            ds, dt = sb.attn.qkv.in_features, tb.attn.qkv.in_features
            self.proj.append(nn.Identity() if ds == dt else nn.Linear(ds, dt))
            sh, th = int(sb.attn.num_heads), int(tb.attn.num_heads)
            t_dim = th * int(tb.attn.head_dim)
            s_dim = sh * int(sb.attn.head_dim)
            import math

            r = sh if (t_dim % sh == 0 and s_dim % sh == 0) else math.gcd(sh, th)
            self.relation_heads.append(r if sh != th else None)

    def loss(self) -> torch.Tensor:
        """The weighted hidden + attention losses of the latest student and teacher forward calls."""
        total: torch.Tensor | None = None
        idx = range(len(self.pairs))
        if self.hidden_weight:
            hs = [self.proj[j](self.s.hidden[j]).float() for j in idx]
            total = self.hidden_weight * FEATURE_LOSSES.get("hidden")(hs, [self.t.hidden[j].float() for j in idx])
        if self.attn_weight:
            sp = [attention_log_probs(self.s.qkv[j], self.s.blocks[j].attn, self.relation_heads[j]) for j in idx]
            tp = [attention_log_probs(self.t.qkv[j], self.t.blocks[j].attn, self.relation_heads[j]) for j in idx]
            a = self.attn_weight * FEATURE_LOSSES.get("attn")(sp, tp)
            total = a if total is None else total + a
        assert total is not None
        return total

    def remove(self) -> None:
        self.s.remove()
        self.t.remove()
