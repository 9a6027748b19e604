"""Transformer students (issue 17 item 2): blocks taken from a ViT teacher, heads and MLP pruned with
Torch-Pruning, hidden-state and attention-map distillation, export, and the CLI choosing it by itself."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("torch_pruning")

KW = dict(num_classes=4, in_channels=3, img_size=16, patch_size=4, embed_dim=48, depth=4, num_heads=4, mlp_ratio=2.0)


def vit(seed: int = 0, **over):
    from kdtoolkit.models.loading import build_arch

    torch.manual_seed(seed)
    return build_arch("cifar_vit", **{**KW, **over}).eval()


def loaded(model, kw=None):
    from kdtoolkit.models.loading import LoadedModel

    return LoadedModel(model, "eager", "mem", arch="cifar_vit", recipe={"arch": "cifar_vit", "arch_kwargs": kw or KW, "transforms": []})


def student_of(teacher, **cfg):
    from kdtoolkit.config import StudentConfig
    from kdtoolkit.student.build import make_student

    return make_student(loaded(teacher), StudentConfig(**cfg), input_shape=(1, 3, 16, 16), num_classes=4)


def test_blocks_only_student_copies_the_teachers_evenly_spaced_blocks() -> None:
    t = vit()
    s, recipe, info = student_of(t, blocks=2)
    assert len(s.blocks) == 2 and info["transformer"]["kept_blocks"] == [1, 3]  # TinyBERT map: (i+1)*4/2 - 1
    for j, i in enumerate([1, 3]):
        for (n, ps), (_, pt) in zip(s.blocks[j].state_dict().items(), t.blocks[i].state_dict().items()):
            assert torch.equal(ps, pt), n
    assert torch.equal(s.patch_embed.proj.weight, t.patch_embed.proj.weight) and torch.equal(s.head.weight, t.head.weight)
    assert recipe["transforms"][0] == {"op": "blocks", "keep": [1, 3]}


def test_heads_and_mlp_are_pruned_to_the_asked_counts_from_the_teachers_weights() -> None:
    t = vit()
    s, recipe, info = student_of(t, blocks=2, heads=2, mlp_hidden=48)
    for b, tb in zip(s.blocks, [t.blocks[1], t.blocks[3]]):
        assert b.attn.num_heads == 2 and b.attn.head_dim == 12 and b.attn.qkv.out_features == 3 * 24
        assert b.attn.proj.in_features == 24 and b.attn.proj.out_features == 48
        assert b.mlp.fc1.out_features == 48 and b.mlp.fc2.in_features == 48
        # every kept q/k/v row and MLP row is a row of the teacher's block (whole heads, head size kept)
        trows = {tuple(r.tolist()) for r in tb.attn.qkv.weight}
        assert all(tuple(r.tolist()) in trows for r in b.attn.qkv.weight)
        frows = {tuple(r.tolist()) for r in tb.mlp.fc1.weight}
        assert all(tuple(r.tolist()) in frows for r in b.mlp.fc1.weight)
    assert info["transformer"]["student"] == {"blocks": 2, "heads": 2, "head_dim": 12, "mlp_hidden": 48, "embed_dim": 48}
    assert s(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    # the recipe rebuilds the same network from its weights (no teacher needed)
    from kdtoolkit.models.loading import build_from_recipe

    r = build_from_recipe(recipe, s.state_dict()).eval()
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(r(x), s(x), atol=1e-6)


def test_cosine_block_selection_keeps_the_blocks_that_change_their_input_most() -> None:
    t = vit()
    with torch.no_grad():  # block 2 becomes (almost) an identity: its residual branches write ~nothing
        for lin in (t.blocks[2].attn.proj, t.blocks[2].mlp.fc2):
            lin.weight.mul_(1e-4)
            lin.bias.zero_()
    x = torch.randn(8, 3, 16, 16)
    s, _, info = student_of_calib(t, x, blocks=3, block_select="cosine")
    assert info["transformer"]["kept_blocks"] == [0, 1, 3]
    assert info["transformer"]["block_influence"][2] < 1e-3


def student_of_calib(teacher, x, **cfg):
    from kdtoolkit.config import StudentConfig
    from kdtoolkit.student.build import make_student

    return make_student(loaded(teacher), StudentConfig(**cfg), input_shape=(1, 3, 16, 16), num_classes=4,
                        calib_batches=[(x, None)])


@pytest.mark.parametrize("cfg, words", [
    ({"blocks": 5}, "5 blocks but the teacher has 4"),
    ({"heads": 8}, "8 attention heads but the teacher's blocks have 4"),
    ({"mlp_hidden": 500}, "MLP of 500 hidden units"),
    ({"mlp_hidden": 20, "channel_multiple": 8}, "not a multiple"),
    ({}, "copy of the teacher"),
])
def test_bad_shapes_are_one_line_input_errors(cfg, words) -> None:
    from kdtoolkit.errors import InputError

    with pytest.raises(InputError, match=words) as e:
        student_of(vit(), **cfg)
    assert "\n" not in str(e.value)


def test_zoo_vit_refuses_a_patch_that_does_not_divide_and_heads_that_do_not_divide_the_width() -> None:
    from kdtoolkit.errors import InputError

    with pytest.raises(InputError, match="patch size 5 does not divide"):
        vit(patch_size=5)
    with pytest.raises(InputError, match="4 heads do not divide the embedding width 50"):
        vit(embed_dim=50, num_heads=4)


def test_attention_map_loss_is_zero_for_identical_models_and_positive_otherwise() -> None:
    from kdtoolkit.distill.losses import TransformerKD

    t = vit()
    same = copy.deepcopy(t)
    x = torch.randn(4, 3, 16, 16)
    kd = TransformerKD(same, t, hidden_weight=1.0, attn_weight=1.0)
    with torch.no_grad():
        same(x), t(x)
    assert kd.loss().item() == pytest.approx(0.0, abs=1e-6)
    kd.remove()
    other, _, _ = student_of(t, blocks=2, heads=2)  # fewer heads: compared through MiniLMv2 relation heads
    kd = TransformerKD(other, t, hidden_weight=0.0, attn_weight=1.0)
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(0.5 * torch.randn_like(other.blocks[0].attn.qkv.weight))
        other(x), t(x)
    assert kd.relation_heads == [2, 2] and kd.loss().item() > 1e-3
    kd.remove()


def test_attention_maps_recomputed_from_qkv_equal_timms_own_explicit_attention() -> None:
    from kdtoolkit.distill.losses import attention_log_probs

    t = vit()
    attn = t.blocks[0].attn
    seen = {}
    h = attn.qkv.register_forward_hook(lambda _m, _i, out: seen.__setitem__("qkv", out))
    x = torch.randn(2, 17, 48)
    attn(x)
    h.remove()
    mine = attention_log_probs(seen["qkv"], attn).exp()
    q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 12).permute(2, 0, 3, 1, 4).unbind(0)
    ref = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    assert torch.allclose(mine, ref, atol=1e-5)


def tiny_splits(n: int = 96):
    from helpers import make_splits

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, n)
    x = (rng.integers(0, 60, (n, 16, 16, 3)) + 40 * y[:, None, None, None]).astype(np.uint8)  # class = brightness
    return make_splits((x, y), (x[:32], y[:32]), (x[:32], y[:32]), 4)


def test_distillation_with_hidden_and_attention_losses_lowers_the_loss_and_resumes(tmp_path) -> None:
    import kdtoolkit.distill.losses as L
    from kdtoolkit.config import LossConfig, TrainConfig
    from kdtoolkit.distill.trainer import Trainer

    t = vit()
    s = vit(seed=1, embed_dim=32, depth=2, num_heads=2)  # narrower than the teacher: a learned projection
    seen: list[float] = []
    orig = L.TransformerKD.loss

    class Killed(Exception):
        pass

    def spy(self):
        if len(seen) == 6 and not getattr(spy, "resumed", False):
            raise Killed  # the process dies during step 7; steps 1-6 are checkpointed
        v = orig(self)
        seen.append(v.item())
        return v

    cfg = TrainConfig(epochs=4, batch_size=32, optimizer="adamw", lr=2e-3, channels_last=False, checkpoint_every=1,
                      loss=LossConfig())
    L.TransformerKD.loss = spy
    try:
        with pytest.raises(Killed):
            Trainer(cfg, tmp_path / "w", progress=False).fit(s, tiny_splits(), teacher=t)
        spy.resumed = True
        r = Trainer(cfg, tmp_path / "w", progress=False).fit(s, tiny_splits(), teacher=t)
    finally:
        L.TransformerKD.loss = orig
    assert len(seen) == 12 and r["steps"] == 12 and all(math.isfinite(v) for v in seen)  # on by default for a ViT pair
    assert [e["epoch"] for e in r["history"]] == [1, 2, 3, 4]
    ck = torch.load(tmp_path / "w" / "last.pt", weights_only=True)
    assert tuple(ck["adapters"]["0.weight"].shape) == (48, 32)  # the projection is checkpointed, not in the student
    assert not any("proj" in k and k.startswith("0.") for k in r["model"].state_dict())
    h = r["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert np.mean(seen[-3:]) < np.mean(seen[:3])


def test_switched_off_transformer_losses_leave_plain_logit_kd(tmp_path) -> None:
    from kdtoolkit.config import LossConfig, TrainConfig
    from kdtoolkit.distill.trainer import Trainer

    t = vit()
    s, _, _ = student_of(t, blocks=2)
    tr = Trainer(TrainConfig(loss=LossConfig(hidden_weight=0, attn_weight=0)), tmp_path, progress=False)
    assert tr._transformer_weights(s, [t]) == (0, 0)
    assert Trainer(TrainConfig(), tmp_path, progress=False)._transformer_weights(s, [t]) == (1.0, 1.0)
    from kdtoolkit.models.zoo import small_cnn

    assert Trainer(TrainConfig(), tmp_path, progress=False)._transformer_weights(small_cnn(4, 3), [t]) == (0.0, 0.0)


def test_exported_student_runs_in_onnx_runtime_with_parity(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from kdtoolkit.export.onnx_export import export_onnx

    s, _, _ = student_of(vit(), blocks=2, heads=3, mlp_hidden=64)
    path = export_onnx(s, (1, 3, 16, 16), tmp_path / "s.onnx")
    x = torch.randn(5, 3, 16, 16)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = s(x).numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_search_measures_block_and_head_candidates_and_meets_the_speedup() -> None:
    from kdtoolkit.config import StudentConfig
    from kdtoolkit.student.search import search

    t = vit(embed_dim=64, depth=4, num_heads=4)
    kw = {**KW, "embed_dim": 64}
    found = search(loaded(t, kw), StudentConfig(), speedup=1.3, input_shape=(1, 3, 16, 16), num_classes=4, batch=8, iters=8)
    names = {c["name"] for c in found["candidates"]}
    assert all(n.startswith("b") and "-h" in n and "-m" in n for n in names)  # blocks x heads x MLP, deduplicated
    assert "b4-h4-m128" not in names  # the teacher's own shape is no student
    assert found["speedup"] >= 1.3 * 0.8  # measured on a noisy shared machine: the pick met it in the search
    assert found["config"].blocks is not None and found["config"].heads is not None


def test_int8_search_times_vit_candidates_as_the_int8_the_profile_would_ship(monkeypatch) -> None:
    """auto INT8 mode ships dynamic INT8 for a transformer on ORT: the search must time that, not static QDQ."""
    import kdtoolkit.quant.ptq as ptq
    from kdtoolkit.config import StudentConfig
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.student.search import search
    from kdtoolkit.targets import load_profile

    made: list[str] = []
    for fn in ("quantize_dynamic_onnx", "quantize_onnx"):
        real = getattr(ptq, fn)
        monkeypatch.setattr(ptq, fn, lambda *a, _f=real, _n=fn, **k: (made.append(_n), _f(*a, **k))[1])
    t = vit(embed_dim=64, depth=4, num_heads=4)
    kw = dict(speedup=1.01, input_shape=(1, 3, 16, 16), num_classes=4, batch=4, iters=4, best_effort=True,
              precision="auto", int8_scheme=scheme_for(load_profile("ort-cpu")), depths=(0.5,), widths=(1.0, 0.5))
    found = search(loaded(t, {**KW, "embed_dim": 64}), StudentConfig(), **kw)
    assert all("p50_int8_ms" in c for c in found["candidates"])
    assert made and set(made) == {"quantize_dynamic_onnx"}
    made.clear()
    search(loaded(t, {**KW, "embed_dim": 64}), StudentConfig(), int8_mode="static", **kw)
    assert made and set(made) == {"quantize_onnx"}


@pytest.mark.slow
def test_compress_on_a_tiny_vit_teacher_picks_a_transformer_student_and_bundles(tmp_path) -> None:
    from conftest import run_cli

    from kdtoolkit.models.loading import save_checkpoint

    t = vit(embed_dim=64)
    kw = {**KW, "embed_dim": 64}
    meta = {"input_size": [16, 16], "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3}  # the model's input beats the zoo's 32x32
    save_checkpoint(tmp_path / "vit.pt", t, {"arch": "cifar_vit", "arch_kwargs": kw, "transforms": []}, meta)
    sp = tiny_splits(160)
    np.savez(tmp_path / "d.npz", x_train=sp.train.x, y_train=sp.train.y, x_test=sp.test.x, y_test=sp.test.y)
    out = tmp_path / "run"
    r = run_cli("compress", str(tmp_path / "vit.pt"), "--data", str(tmp_path / "d.npz"), "--out", str(out), "--profile", "ort-cpu",
                "--speedup", "1.5", "--epochs", "1", "--batch-size", "32", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((out / "01-student" / "manifest.json").read_text())
    tinfo = man["info"]["surgery"]["transformer"]
    assert tinfo["student"]["blocks"] < 4 or tinfo["student"]["heads"] < 4
    assert (out / "bundle" / "manifest.json").exists()
    goal = json.loads((out / "summary.json").read_text())["speed_goal"]  # the search's goal re-checked on what shipped
    assert goal["target"] == 1.5 and goal["batch"] == 1 and goal["met"] == (goal["measured"] >= 1.5)


@pytest.mark.parametrize("arch", ["cifar_vit", "cifar_deit"])
def test_qat_graph_of_a_vit_exports_to_qdq_onnx_that_follows_the_fake_quant_model(arch, tmp_path) -> None:
    """timm's optional forward arguments (attn_mask, is_causal) must not become graph inputs of the QAT graph:
    the ONNX export then passes a tensor where scaled_dot_product_attention needs a bool."""
    from kdtoolkit.backends.ort import make_session
    from kdtoolkit.models.loading import build_arch
    from kdtoolkit.quant.qat import calibrate, export_qdq, prepare_qat
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    torch.manual_seed(0)
    model = build_arch(arch, **{**KW, "depth": 2}).eval()
    sch = scheme_for(load_profile("ort-cpu"))
    gm = prepare_qat(model, sch)
    x = torch.randn(32, 3, 16, 16)
    calibrate(gm, x.numpy(), sch, method="minmax")
    out = tmp_path / "qat.onnx"
    export_qdq(gm, (1, 3, 16, 16), out)
    with torch.no_grad():
        ref, fp32 = gm(x).numpy(), model(x).numpy()
    got = make_session(out).run(None, {"input": x.numpy()})[0]
    assert got.shape == (32, 4)
    # the QDQ graph follows the fake-quant model far more closely than either follows FP32
    assert np.abs(got - ref).max() < 0.25 * np.abs(fp32 - ref).max() + 1e-3, (np.abs(got - ref).max(), np.abs(fp32 - ref).max())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
