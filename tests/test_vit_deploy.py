"""Deploying transformer blocks (issue 17, item 4): ONNX of a ViT, INT8 on ORT CPU (static QDQ and dynamic), and the
static TensorRT check's findings per release. Tiny ViT (1x28x28, patch 4, dim 32, depth 2); TensorRT is never run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "usercode"))
import user_models  # noqa: E402


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory) -> dict[int, Path]:
    from kdtoolkit.export.onnx_export import export_onnx

    torch.manual_seed(0)
    m = user_models.TinyViT().eval()
    d = tmp_path_factory.mktemp("vit")
    return {op: export_onnx(m, (1, 1, 28, 28), d / f"vit{op}.onnx", opset=op) for op in (16, 17)} | {0: m}  # type: ignore[dict-item]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_export_parity_dynamic_batch_and_layernorm_form_per_opset(vit_onnx):
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    ref = vit_onnx[0](torch.from_numpy(x)).detach().numpy()
    for op in (16, 17):
        np.testing.assert_allclose(_run(vit_onnx[op], x), ref, atol=1e-4)
        ops = {n.op_type for n in onnx.load(str(vit_onnx[op])).graph.node}
        assert ("LayerNormalization" in ops) == (op == 17)  # opset 16: decomposed, for TensorRT 8.5


def test_export_stage_reexports_a_vit_at_opset_16_for_tensorrt_85(tmp_path, vit_onnx):
    from kdtoolkit.export.onnx_export import export_artifact

    art = export_artifact(vit_onnx[0], (1, 1, 28, 28), tmp_path / "e", opset=17, config={}, model_meta={}, trt_min_version="8.5")
    assert art.info["opset"] == 16 and "LayerNormalization" in art.info["opset_note"]
    assert "LayerNormalization" not in {n.op_type for n in onnx.load(str(art.file("model.onnx"))).graph.node}


def _calib(n: int = 32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 1, 28, 28)).astype(np.float32)


def test_static_ort_ptq_quantizes_attention_matmuls(tmp_path, vit_onnx):
    from kdtoolkit.backends.transformer_check import attention_blocks
    from kdtoolkit.quant.ptq import quantize_onnx
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    info = quantize_onnx(vit_onnx[17], tmp_path / "s.onnx", _calib(), scheme_for(load_profile("ort-cpu"), reduce_range=False))
    assert info["op_types"]["list"].startswith("ORT's QDQ registry")
    m = onnx.load(str(tmp_path / "s.onnx"))
    prod = {o: n for n in m.graph.node for o in n.output}
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    assert mm and all(prod[i].op_type == "DequantizeLinear" for n in mm for i in n.input[:2])  # both inputs, attention included
    assert len(attention_blocks(m)) == 2
    assert sum(n.op_type == "Softmax" for n in m.graph.node) == 2  # Softmax stays a float op between a DQ and a Q
    x = _calib(8)
    ref, got = _run(vit_onnx[17], x), _run(tmp_path / "s.onnx", x)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.98


def test_dynamic_int8_runs_matmulinteger_and_is_refused_for_tensorrt(tmp_path, vit_onnx):
    from kdtoolkit.errors import InputError
    from kdtoolkit.quant.ptq import quantize_dynamic_onnx
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    info = quantize_dynamic_onnx(vit_onnx[17], tmp_path / "d.onnx", scheme_for(load_profile("ort-cpu"), reduce_range=False))
    assert info["integer_ops"] == ["DynamicQuantizeLinear", "MatMulInteger"] and info["calib_samples"] == 0
    import onnx

    g = onnx.load(str(tmp_path / "d.onnx")).graph  # every weight MatMul/Gemm became integer; attention's stay float
    weights = {i.name for i in g.initializer}
    assert not [n.name for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert sum(n.op_type == "MatMulInteger" for n in g.node) >= 4
    x = _calib(3)
    ref, got = _run(vit_onnx[17], x), _run(tmp_path / "d.onnx", x)
    assert got.shape == (3, 10) and np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.98
    with pytest.raises(InputError, match="dynamic INT8 is for ONNX Runtime CPU targets"):
        quantize_dynamic_onnx(vit_onnx[17], tmp_path / "t.onnx", scheme_for(load_profile("jetson-agx-orin")))


def test_auto_int8_mode_is_dynamic_for_a_transformer_on_onnxruntime_only(tmp_path, vit_onnx):
    from kdtoolkit.export.onnx_export import export_onnx
    from kdtoolkit.quant.ptq import resolve_mode
    from kdtoolkit.targets import load_profile

    assert load_profile("ort-cpu").quant.mode == "auto"
    assert resolve_mode("auto", "onnxruntime", vit_onnx[17])[0] == "dynamic"
    assert resolve_mode("auto", "tensorrt", vit_onnx[17])[0] == "static"  # TensorRT parses no MatMulInteger
    cnn = export_onnx(user_models.Plain().eval(), (1, 1, 28, 28), tmp_path / "cnn.onnx")
    assert resolve_mode("auto", "onnxruntime", cnn) == ("static", "auto: static Q/DQ (not a transformer graph)")
    assert resolve_mode("static", "onnxruntime", vit_onnx[17])[0] == "static"  # an explicit mode is kept


@pytest.mark.slow
def test_quantize_cli_int8_mode_dynamic_is_recorded(tmp_path):
    import json

    from tests.conftest import run_cli

    torch.manual_seed(0)
    torch.save(user_models.TinyViT().eval(), tmp_path / "vit.pt")
    r = run_cli("quantize", str(tmp_path / "vit.pt"), "--trust-pickle", "--data", "mnist-mini", "--int8-mode", "dynamic",
                "--out", str(tmp_path / "q"), cwd=Path(__file__).parent / "usercode")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dynamic INT8" in r.stdout
    man = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert man["config"]["mode"] == "dynamic" and man["info"]["quantization"]["method"] == "dynamic"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "int8.onnx")).graph.node}
    assert "MatMulInteger" in ops and "QuantizeLinear" not in ops


def _findings(path: Path, profile: str, version: str) -> dict[str, list]:
    from kdtoolkit.backends.check import check_file
    from kdtoolkit.targets import load_profile

    rep = check_file(path, load_profile(profile), tensorrt_version=version)
    out: dict[str, list] = {}
    for f in rep.findings:
        out.setdefault(f.rule, []).append(f)
    return out


def test_tensorrt_check_reports_transformer_blocks_per_release(tmp_path, vit_onnx):
    f85_17 = _findings(vit_onnx[17], "jetson-agx-orin", "8.5")
    assert len(f85_17["unsupported-op"]) == 5 and all("LayerNormalization" in f.message for f in f85_17["unsupported-op"])
    assert "re-export at opset 16" in f85_17["transformer.layernorm"][0].message
    f85_16 = _findings(vit_onnx[16], "jetson-agx-orin", "8.5")
    assert "unsupported-op" not in f85_16
    assert "2 attention block(s)" in f85_16["transformer.blocks"][0].message and "5 decomposed" in f85_16["transformer.blocks"][0].message
    assert "documents no fused multi-head attention" in f85_16["transformer.mha"][0].message
    assert "2 GELU(s)" in f85_16["transformer.gelu"][0].message
    (ov,) = f85_16["transformer.fp16-overflow"]
    assert ov.severity == "warning" and "255.9" in ov.message and "Heuristic" in ov.message
    f103 = _findings(vit_onnx[17], "jetson-agx-orin", "10.3")
    assert "unsupported-op" not in f103 and "parsed natively by TensorRT 10.3" in f103["transformer.layernorm"][0].message
    assert "Myelin MHA fusion" in f103["transformer.mha"][0].message
    # strongly typed TensorRT 11 with a non-FP16 profile: no FP16 overflow warning
    assert "transformer.fp16-overflow" not in _findings(vit_onnx[17], "desktop-gpu", "11.0")
    # a CNN is not a transformer: no transformer findings
    from kdtoolkit.export.onnx_export import export_onnx

    cnn = export_onnx(user_models.Plain().eval(), (1, 1, 28, 28), tmp_path / "cnn.onnx")
    assert not any(k.startswith("transformer.") for k in _findings(cnn, "jetson-agx-orin", "10.3"))


def test_tensorrt_check_counts_int8_matmuls_in_a_tensorrt_scheme_qdq_vit(tmp_path, vit_onnx):
    from kdtoolkit.quant.ptq import quantize_onnx
    from kdtoolkit.quant.schemes import scheme_for
    from kdtoolkit.targets import load_profile

    quantize_onnx(vit_onnx[17], tmp_path / "t.onnx", _calib(), scheme_for(load_profile("jetson-agx-orin")))
    (f,) = _findings(tmp_path / "t.onnx", "jetson-agx-orin", "10.3")["transformer.int8-matmul"]
    n_mm = sum(1 for n in onnx.load(str(tmp_path / "t.onnx")).graph.node if n.op_type == "MatMul")
    assert f.message.startswith(f"{n_mm} of {n_mm} MatMul(s)") and "(4 of them attention MatMuls" in f.message
