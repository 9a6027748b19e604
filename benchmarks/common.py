"""What several benchmarks share: the CIFAR-10 JPEG subset and the ResNet-56 -> separable ResNet-20 pair."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the shared teachers' training normalisation


def shared_teacher_data() -> tuple[Path, Path]:
    """(CIFAR-10 JPEG archive, fine-tuned ResNet-56 weights) from the shared folder, or exit with one line."""
    import sys

    tar, weights = DATA / "cifar10-jpeg.tar.gz", DATA / "weights" / "resnet56-cifar10-jpeg-ft.th"
    if not tar.exists() or not weights.exists():
        sys.exit(f"error: needs {tar} and {weights} (the shared data folder beside the checkout)")
    return tar, weights


def r56_teaches_separable_r20(train_limit: int, seed: int) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(splits, teacher, student, the student's initial state): the fine-tuned ResNet-56 and kdtoolkit's
    SVD-initialised separable conversion of the pretrained ResNet-20, on a seeded training subset."""
    import torch

    from kdtoolkit.config import StudentConfig
    from kdtoolkit.data import batches, load_data
    from kdtoolkit.models.loading import load_model
    from kdtoolkit.student.build import make_student

    splits = load_data(str(DATA / "cifar10-jpeg.tar.gz"), mean=MEAN, std=STD, train_limit=train_limit, test_limit=256,
                       val_fraction=0.05, seed=seed)
    splits.val = splits.val.subset(list(range(min(64, len(splits.val)))))
    teacher = load_model(DATA / "weights" / "resnet56-cifar10-jpeg-ft.th", arch="cifar_resnet56").module.eval()
    r20 = load_model(DATA / "weights" / "resnet20-cifar10.th", arch="cifar_resnet20")
    torch.manual_seed(seed)
    student, _, _ = make_student(r20, StudentConfig(separable=True), input_shape=(1, 3, 32, 32), num_classes=10,
                                 calib_batches=batches(splits.train, splits.spec, 64, shuffle=True, seed=seed))
    return splits, teacher, student, copy.deepcopy(student.state_dict())
