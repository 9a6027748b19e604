"""A CNN teacher distilling into a ViT student with DeiT's distillation token (issue 17, the opt-in
`--student-arch cifar_deit`): the loss against the paper's formula, the two heads learning what they
should, and the command line building the student for the data's image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import run_cli

pytest.importorskip("timm")


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_distillation_token_loss_is_the_papers_formula() -> None:
    from kdtoolkit.distill.losses import distillation_token_loss

    rng = np.random.default_rng(0)
    cls, dist, t = (rng.normal(size=(5, 4)).astype(np.float32) for _ in range(3))
    y = np.array([0, 1, 2, 3, 1])
    ce = lambda z, lab: float(-_np_log_softmax(z)[np.arange(5), lab].mean())  # noqa: E731
    tt = lambda a: torch.from_numpy(a)  # noqa: E731
    hard = distillation_token_loss(tt(cls), tt(dist), tt(t), torch.from_numpy(y), mode="hard")
    assert float(hard) == pytest.approx(0.5 * ce(cls, y) + 0.5 * ce(dist, t.argmax(1)), rel=1e-5)
    T, a = 3.0, 0.7
    p_t, lq = np.exp(_np_log_softmax(t / T)), _np_log_softmax(dist / T)
    kl = float((p_t * (np.log(p_t) - lq)).sum(1).mean()) * T * T
    soft = distillation_token_loss(tt(cls), tt(dist), tt(t), torch.from_numpy(y), mode="soft", alpha=a, temperature=T)
    assert float(soft) == pytest.approx((1 - a) * ce(cls, y) + a * kl, rel=1e-5)
    # several teachers: their mean; no teacher logits: both heads learn the labels
    two = distillation_token_loss(tt(cls), tt(dist), torch.stack([tt(t), tt(t) + 1.0]), torch.from_numpy(y), mode="hard")
    assert float(two) == pytest.approx(float(hard), rel=1e-6)
    none = distillation_token_loss(tt(cls), tt(dist), None, torch.from_numpy(y))
    assert float(none) == pytest.approx(0.5 * ce(cls, y) + 0.5 * ce(dist, y), rel=1e-5)


def _colour_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of one random colour plus a little noise: a teacher reading the mean colour decides their class."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, size=(n, 1, 1, 3))
    return np.clip(colour + rng.normal(0, 4, size=(n, 16, 16, 3)), 0, 255).astype(np.uint8), colour[:, 0, 0, :]


def test_hard_distillation_trains_the_token_head_on_the_teacher_and_the_class_head_on_the_labels(tmp_path) -> None:
    """Labels and teacher disagree on every image; DeiT's two heads must each learn their own target."""
    from helpers import make_splits

    from kdtoolkit.config import LossConfig, TrainConfig
    from kdtoolkit.distill.trainer import Trainer
    from kdtoolkit.models.loading import build_arch

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).eval()
    with torch.no_grad():
        teacher[2].weight.copy_(torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [-2.0, -2.0, -2.0]]))
        teacher[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.5]))
    x, _ = _colour_data(320, 0)
    with torch.no_grad():
        t_cls = teacher(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    assert len(set(t_cls.tolist())) >= 3  # the teacher's classes vary over the data
    y = (t_cls + 1) % 4  # the labels never agree with the teacher
    splits = make_splits((x[:256], y[:256]), (x[256:288], y[256:288]), (x[288:], y[288:]), 4)
    student = build_arch("cifar_deit", num_classes=4, in_channels=3, img_size=16, patch_size=4, embed_dim=32, depth=2,
                         num_heads=2, mlp_ratio=2.0)
    cfg = TrainConfig(optimizer="adamw", lr=3e-3, weight_decay=0.0, batch_size=32, epochs=25, warmup_steps=10, seed=0,
                      checkpoint_every=1000, channels_last=False, loss=LossConfig(name="kd", distill_token="hard"))
    model = Trainer(cfg, tmp_path / "work").fit(student.train(), splits, teacher=teacher)["model"]
    assert model.distilled_training is False  # switched off again: the heads are averaged in training mode too
    xt = torch.from_numpy(x[:256]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        feats = model.forward_features(xt)
        cls_head, dist_head = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
        out = model.eval()(xt)
    torch.testing.assert_close(out, (cls_head + dist_head) / 2)  # what exports: one output, the two heads averaged
    agree = lambda z, target: float((z.argmax(1).numpy() == target).mean())  # noqa: E731
    assert agree(dist_head, t_cls[:256]) > 0.8, agree(dist_head, t_cls[:256])
    assert agree(cls_head, y[:256]) > 0.8, agree(cls_head, y[:256])
    assert agree(dist_head, y[:256]) < 0.2 and agree(cls_head, t_cls[:256]) < 0.2


def test_distill_cli_builds_a_deit_student_for_the_datas_image_size(tiny_teacher, tmp_path) -> None:
    """`--student-arch cifar_deit` on 28x28 single-channel data: the zoo ViT takes its patch grid from the data."""
    out = tmp_path / "deit"
    r = run_cli("distill", str(tiny_teacher), "--student-arch", "cifar_deit", "--data", "mnist-mini", "--out", str(out),
                "--epochs", "1", "--max-steps", "3", "--train-limit", "240", "--test-limit", "60", "--batch-size", "16",
                "--set", "loss.distill_token=soft")
    assert r.returncode == 0, r.stderr
    assert "DeiT distillation token" in r.stdout + r.stderr
    from kdtoolkit.models.loading import load_model

    loaded = load_model(out)
    assert loaded.recipe["arch"] == "cifar_deit" and loaded.recipe["arch_kwargs"]["img_size"] == 28
    assert loaded.module.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.slow
def test_compress_distils_a_cnn_teacher_into_a_deit_student_and_ships_its_int8(tiny_teacher, tmp_path) -> None:
    """The whole front door with the opt-in student: DeiT distillation, INT8 of the ViT, bundle."""
    out = tmp_path / "run"
    r = run_cli("compress", str(tiny_teacher), "--data", "mnist-mini", "--out", str(out), "--profile", "ort-cpu",
                "--student-arch", "cifar_deit", "--epochs", "1", "--train-limit", "320", "--test-limit", "100", "--batch-size", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DeiT distillation token" in r.stdout + r.stderr
    import json

    q = json.loads((out / "05-quantize" / "manifest.json").read_text())
    # ort-cpu's INT8 mode is auto: a ViT student gets dynamic INT8 (measured faster than static QDQ for ViTs)
    assert q["info"]["quantization"]["method"] == "dynamic" and "transformer graph" in r.stdout + r.stderr
    assert (out / "bundle" / "manifest.json").exists()
