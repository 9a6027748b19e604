"""The trainer in-process: teacher cache, divergence, bad inputs, feature distillation, freezing, lr groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdtoolkit.data import load_data
from kdtoolkit.distill.trainer import LossConfig, TrainConfig, Trainer, param_groups
from kdtoolkit.errors import InputError, TrainingDiverged
from kdtoolkit.models.zoo import small_cnn


@pytest.fixture(scope="module")
def splits():
    return load_data("mnist-mini", train_limit=200, test_limit=50)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=2, max_steps=None, batch_size=32, lr=0.05, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class Counting(nn.Module):
    """Counts forward calls of the wrapped teacher."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return small_cnn(10, 1, 0.25)


def test_teacher_cache_skips_teacher_forward(splits, tmp_path) -> None:
    torch.manual_seed(1)
    t = Counting(small_cnn(10, 1, 0.25))
    res = Trainer(_cfg(batch_size=64), tmp_path / "c", progress=False).fit(_student(), splits, teacher=t)
    assert (tmp_path / "c" / "teacher_logits.npy").exists()
    steps = res["steps"]
    assert steps >= 4
    # one call to check the output size, one batch of 512 to fill the cache; none during the epochs
    assert t.calls == 2
    t2 = Counting(t.inner)
    Trainer(_cfg(batch_size=64, cache_teacher=False), tmp_path / "n", progress=False).fit(_student(), splits, teacher=t2)
    assert t2.calls == 1 + steps


def test_nan_loss_stops_and_keeps_last_good_checkpoint(splits, tmp_path) -> None:
    cfg = _cfg(lr=1e30, grad_clip=None, checkpoint_every=1, loss=LossConfig(name="ce"))
    with pytest.raises(TrainingDiverged, match="last good checkpoint") as ei:
        Trainer(cfg, tmp_path, progress=False).fit(_student(), splits)
    assert "\n" not in str(ei.value)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] >= 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.dtype.is_floating_point)


def test_bad_inputs_are_one_line_input_errors(splits, tmp_path) -> None:
    with pytest.raises(InputError, match="larger than the training split"):
        Trainer(_cfg(batch_size=10_000), tmp_path, progress=False).fit(_student(), splits)
    with pytest.raises(InputError, match="teacher has 7 outputs but the student has 10"):
        Trainer(_cfg(), tmp_path, progress=False).fit(_student(), splits, teacher=small_cnn(7, 1, 0.25))
    with pytest.raises(InputError, match=r"hint layer 'features\.99' does not exist in the student; close names: .*features\.9"):
        Trainer(_cfg(loss=LossConfig(hint_weight=1.0, hints=["features.99"])), tmp_path, progress=False).fit(
            _student(), splits, teacher=small_cnn(10, 1, 0.5))


def test_auto_hint_pairs_by_spatial_size() -> None:
    from kdtoolkit.distill.losses import auto_pairs, resolve_pairs
    from kdtoolkit.models.zoo import ARCHS

    t, s = ARCHS.get("cifar_resnet56")(), ARCHS.get("cifar_resnet20")(width=0.5)
    assert auto_pairs(s, t, (3, 32, 32)) == [("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]
    assert resolve_pairs(s, t, (3, 32, 32), ["layer2.2"]) == [("layer2.2", "layer2")]
    assert resolve_pairs(s, t, (3, 32, 32), ["layer3:layer3.8"]) == [("layer3", "layer3.8")]
    with pytest.raises(InputError, match="'layer9' does not exist in the teacher"):
        resolve_pairs(s, t, (3, 32, 32), ["layer3:layer9"])


def test_hints_and_at_train_and_adapters_stay_out_of_the_student(splits, tmp_path) -> None:
    cfg = _cfg(epochs=1, max_steps=3, checkpoint_every=1, loss=LossConfig(hint_weight=1.0, at_weight=100.0))
    student = _student()
    keys = set(student.state_dict())
    torch.manual_seed(2)
    res = Trainer(cfg, tmp_path, progress=False).fit(student, splits, teacher=small_cnn(10, 1, 0.5))
    assert set(res["model"].state_dict()) == keys
    assert not res["model"]._forward_hooks and not any(m._forward_hooks for m in res["model"].modules())
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["adapters"] and all(k.split(".")[1] in ("conv", "bn") for k in state["adapters"])


def test_multi_teacher_confidence_runs(splits, tmp_path) -> None:
    cfg = _cfg(epochs=1, max_steps=2, loss=LossConfig(teacher_weighting="confidence"))
    res = Trainer(cfg, tmp_path, progress=False).fit(_student(), splits, teacher=[small_cnn(10, 1, 0.25), small_cnn(10, 1, 0.25)])
    assert res["steps"] == 2 and (tmp_path / "teacher1_logits.npy").exists()


def test_lr_scale_groups_are_real(splits) -> None:
    m = _student()
    groups = param_groups(m, _cfg(lr_scales={"": 0.1, "classifier": 1.0}))
    by_scale: dict[float, int] = {}
    for g in groups:
        by_scale[g["lr_scale"]] = by_scale.get(g["lr_scale"], 0) + sum(p.numel() for p in g["params"])
    assert by_scale[1.0] == sum(p.numel() for p in m.classifier.parameters())
    assert by_scale[0.1] == sum(p.numel() for p in m.features.parameters())
    assert {(g["lr_scale"], g["weight_decay"] > 0) for g in groups} == {(1.0, True), (1.0, False), (0.1, True), (0.1, False)}


def test_freeze_and_gradual_unfreezing(splits, tmp_path) -> None:
    m = _student()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = _cfg(epochs=2, freeze=["features.0", "features.9"], unfreeze_every=1, loss=LossConfig(name="ce"),
               lr_scales={"": 0.5, "classifier": 1.0})
    torch.manual_seed(0)
    Trainer(cfg, tmp_path, progress=False).fit(m, splits)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2
    after = state["model"]  # the returned model is the best on validation; the last state is here
    # features.0 stayed frozen both epochs; features.9 was unfrozen for epoch 2 (deepest first)
    assert torch.equal(after["features.0.weight"], before["features.0.weight"])
    assert not torch.equal(after["features.9.weight"], before["features.9.weight"])
    assert all(p.requires_grad for p in m.parameters())


def test_finetune_head_and_stages() -> None:
    from kdtoolkit.distill.finetune import replace_head, stage_names
    from kdtoolkit.models.zoo import ARCHS

    m = ARCHS.get("cifar_resnet20")()
    recipe = {"arch": "cifar_resnet20", "arch_kwargs": {"num_classes": 10}}
    assert replace_head(m, 10, recipe) == ("linear", False)
    assert replace_head(m, 4, recipe) == ("linear", True)
    assert m.linear.out_features == 4 and recipe["arch_kwargs"]["num_classes"] == 4
    assert stage_names(m, "linear") == ["conv1", "bn1", "layer1", "layer2", "layer3"]


def test_channels_last_trains_the_same_weights_and_hands_back_nchw(splits, tmp_path) -> None:
    """The memory format is a speed choice only: same steps, same weights (to float tolerance)."""
    torch.manual_seed(1)
    teacher = small_cnn(10, 1, 0.25)
    out = {}
    for cl in (True, False):
        res = Trainer(_cfg(epochs=1, channels_last=cl), tmp_path / str(cl), progress=False).fit(_student(), splits, teacher=teacher)
        out[cl] = res["model"].state_dict()
        assert all(v.is_contiguous() for v in out[cl].values())  # saved and exported as ordinary NCHW tensors
    assert out[True].keys() == out[False].keys()
    for k in out[True]:
        assert torch.allclose(out[True][k].float(), out[False][k].float(), atol=1e-4), k
    # the teacher the caller passed in is left in its own format
    assert all(p.is_contiguous() for p in teacher.parameters())
