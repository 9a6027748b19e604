"""A student for every convolutional classifier users bring (torchvision classics saved as full pickles).

Slow: each search exports and times up to 15 candidates. Already-separable nets (MobileNetV3,
EfficientNet-B0, RegNetX with group convs) have nothing left to convert, so depth and width
shrinking must make a student at least 2x faster at the profile's opt batch (ONNX Runtime CPU).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchvision", reason="torchvision is not installed (see README: torch 2.14.1 + torchvision 0.29.1)")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny"])
def test_torchvision_pickle_gets_a_2x_student(name, tmp_path):
    import torchvision

    from kdtoolkit.models.loading import load_model
    from kdtoolkit.stages import DEFAULT_SPEEDUP, resolve_student_config
    from kdtoolkit.student.build import StudentConfig, count_params, make_student
    from kdtoolkit.targets import load_profile

    path = tmp_path / "model.pt"
    torch.save(torchvision.models.get_model(name, num_classes=10).eval(), path)  # what users save
    teacher = load_model(path, trust_pickle=True)
    assert teacher.form == "pickle" and teacher.recipe is None
    shape = (1, 3, 64, 64)
    cfg, found = resolve_student_config(StudentConfig(), load_profile("jetson-agx"), teacher, shape, 10, progress=False)
    student, recipe, _ = make_student(teacher, cfg, input_shape=shape, num_classes=10)
    assert recipe is None  # stored as a torch.export program by the pipeline
    assert found is not None and found["speedup"] >= DEFAULT_SPEEDUP
    assert count_params(student) < count_params(teacher.module)
    assert student(torch.zeros(2, *shape[1:])).shape == (2, 10)
