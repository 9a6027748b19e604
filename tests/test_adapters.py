"""Adapters through peft (kdtoolkit.adapters, finetune --adapter, adapter merge) on the small CNN and mnist-mini."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from tests.conftest import run_cli

pytest.importorskip("peft", reason="the adapters extra (peft) is not installed")

TINY = ["--data", "mnist-mini", "--train-limit", "240", "--test-limit", "60", "--batch-size", "16", "--quiet"]


def _one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _small(seed: int = 0) -> nn.Module:
    from kdtoolkit.models.zoo import small_cnn

    torch.manual_seed(seed)
    return small_cnn(num_classes=10, in_channels=1, width=0.25).eval()


def _nudge(pm: nn.Module) -> None:
    """Give every trainable tensor a non-zero, seeded change (LoRA's B starts at zero: an untrained adapter is a no-op)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_only_adapters_head_and_norms_train(method: str) -> None:
    from kdtoolkit.adapters import attach, trainable
    from kdtoolkit.config import AdapterConfig

    model = _small()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    head = model.classifier
    r = 2
    pm, plan = attach(model, AdapterConfig(method=method, rank=r), "classifier")
    assert plan["targets"] == ["features.0", "features.3", "features.6", "features.9"]  # every conv, not the head
    per_conv = [c.in_channels * c.kernel_size[0] * c.kernel_size[1] for c in convs]
    if method == "lora":  # A: r x in x k x k, B: out x r
        adapter = sum(r * k + c.out_channels * r for c, k in zip(convs, per_conv))
    else:  # LoHa: two Hadamard factors, each (out x r) and (r x in*k*k)
        adapter = sum(2 * (c.out_channels * r + r * k) for c, k in zip(convs, per_conv))
    expected = adapter + sum(2 * n.num_features for n in norms) + head.weight.numel() + head.bias.numel()
    assert trainable(pm)["trainable_params"] == expected
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert all((f"{method}_" in n or "hada_" in n or ".modules_to_save." in n) for n in names), names
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".base_layer." in n or ".original_module." in n)


def test_saved_adapter_is_small_reloads_exactly_and_merges_for_onnx(tmp_path) -> None:
    import onnxruntime as ort

    from kdtoolkit.adapters import apply_adapter, attach, base_reference, merge, read_adapter, save_adapter
    from kdtoolkit.config import AdapterConfig
    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.models.loading import load_model, save_checkpoint

    recipe = {"arch": "small_cnn", "arch_kwargs": {"num_classes": 10, "in_channels": 1, "width": 0.25}, "transforms": []}
    base_path = save_checkpoint(tmp_path / "base.pt", _small(), recipe)
    cfg = AdapterConfig(rank=2)
    pm, plan = attach(load_model(base_path).module, cfg, "classifier")
    pm.train()
    with torch.no_grad():
        pm(torch.randn(16, 1, 28, 28))  # BatchNorm running statistics move, as in training: they must travel too
    _nudge(pm)
    pm.eval()
    ref = base_reference(base_path, arch="small_cnn", recipe=recipe, head="classifier", num_classes=10, head_replaced=False)
    d = save_adapter(pm, tmp_path / "adapter", base=ref, cfg=cfg, adapter_plan=plan)
    assert {p.name for p in d.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "kdtoolkit_adapter.json"}
    assert (d / "adapter_model.safetensors").stat().st_size < 0.5 * base_path.stat().st_size
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pm(x)
        again = apply_adapter(load_model(base_path).module, read_adapter(d)).eval()  # a fresh base, the saved adapter
        assert torch.equal(again(x), want)
        merged = merge(again)
        assert type(merged).__name__ == "SmallCNN" and not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
        assert (merged(x) - load_model(base_path).module(x)).abs().max() > 1e-3  # the adapter changed something
    onnx_path = export_onnx(merged, (1, 1, 28, 28), tmp_path / "merged.onnx")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_rank_bound_and_targets_are_checked_before_training() -> None:
    from kdtoolkit.adapters import check_rank, max_rank, plan
    from kdtoolkit.config import AdapterConfig
    from kdtoolkit.errors import InputError

    assert max_rank(nn.Conv2d(3, 16, 3)) == 16 and max_rank(nn.Conv2d(1, 8, 3)) == 8 and max_rank(nn.Linear(32, 10)) == 10
    assert max_rank(nn.Conv2d(64, 64, 1)) == 64
    model = _small()
    with pytest.raises(InputError, match=r"--rank 9 is larger than layer features.0 \(Conv2d 1->8, 3x3\) allows: at most 8"):
        check_rank(model, ["features.0"], 9)
    assert plan(model, AdapterConfig(rank=9, target_modules=["features.[369]"]), "classifier")["targets"] == \
        ["features.3", "features.6", "features.9"]
    with pytest.raises(InputError, match="matches no Linear/Conv2d layer"):
        plan(model, AdapterConfig(target_modules=["encoder.*"]), "classifier")
    dw = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.LazyLinear(2))
    assert plan(dw, AdapterConfig(rank=2), "3")["targets"] == ["1"]  # depthwise left out by default: peft cannot merge it


def test_finetune_adapter_cli_artifact_merge_and_errors(tiny_teacher, tmp_path) -> None:
    from kdtoolkit.artifact import Artifact
    from kdtoolkit.models.loading import load_model

    out = tmp_path / "ft"
    r = run_cli("finetune", str(tiny_teacher), "--out", str(out), "--adapter", "lora", "--rank", "2", "--epochs", "1",
                "--max-steps", "3", "--lr", "0.05", *TINY)
    assert r.returncode == 0, r.stderr
    art = Artifact.load(out)
    assert {"model.pt", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/kdtoolkit_adapter.json"} <= \
        set(art.manifest.files)
    assert art.metrics["adapter"] == "lora" and art.metrics["trainable_params"] < art.metrics["params"]
    assert art.metrics["merge_max_abs_diff"] < 1e-4
    merged = load_model(out)  # what compress takes as its model: a plain checkpoint, adapters merged in
    assert merged.recipe["arch"] == "small_cnn" and not any("lora" in k for k in merged.module.state_dict())
    # the adapter alone, applied to the base again: the same model
    r = run_cli("adapter", "merge", str(tiny_teacher), str(out / "adapter"), "--out", str(tmp_path / "m2"))
    assert r.returncode == 0, r.stderr
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m2").module(x), merged.module(x), rtol=1e-5, atol=1e-5)
    # a different base: refused by sha256, one line, exit 2, nothing written
    other = tmp_path / "other.pt"
    state = torch.load(tiny_teacher, weights_only=True)
    state["state_dict"]["classifier.bias"] += 1
    torch.save(state, other)
    r = run_cli("adapter", "merge", str(other), str(out), "--out", str(tmp_path / "m3"))
    _one_line_error(r, 2, "sha256", "exact base model")
    assert not (tmp_path / "m3").exists()
    r = run_cli("finetune", str(other), "--out", str(tmp_path / "m4"), "--adapter-path", str(out), "--max-steps", "1", *TINY)
    _one_line_error(r, 2, "sha256")
    # rank too large for the 1->8 stem, unknown method, targets matching nothing: one line, before training, nothing written
    for args, needles in ((["--adapter", "lora", "--rank", "9"], ("--rank 9", "features.0", "at most 8")),
                          (["--adapter", "ia4"], ("unknown adapter method 'ia4'", "lora, loha")),
                          (["--adapter", "loha", "--target-modules", "encoder.*"], ("matches no Linear/Conv2d",))):
        bad = tmp_path / "bad"
        r = run_cli("finetune", str(tiny_teacher), "--out", str(bad), "--max-steps", "1", *args, *TINY)
        _one_line_error(r, 2, *needles)
        assert not bad.exists() and not list(tmp_path.glob(".bad.work-*"))


@pytest.mark.slow
def test_adapter_run_killed_resumes_to_the_same_adapter(tiny_teacher, tmp_path) -> None:
    from safetensors.torch import load_file

    args = ["finetune", str(tiny_teacher), "--adapter", "lora", "--rank", "2", "--epochs", "2", "--checkpoint-every", "2",
            "--augment", "none", *TINY]
    ref = run_cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "kdtoolkit", *args, "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not list(tmp_path.glob(".run.work-*/last.pt")):
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()
    (ckpt,) = tmp_path.glob(".run.work-*/last.pt")
    assert torch.load(ckpt, weights_only=True)["step"] < 26
    r = run_cli(*args[:-1], "--out", str(out))  # without --quiet: the resume is announced
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
