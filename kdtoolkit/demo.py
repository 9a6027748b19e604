"""The built-in example: train a small CNN teacher on the packed MNIST subset, then ``compress`` it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtoolkit import fsutil
from kdtoolkit.artifact import Artifact, ArtifactWriter
from kdtoolkit.progress import log

DATASET = "mnist-mini"


def train_teacher(out_dir: Path, *, epochs: int = 3, progress: bool = True) -> Artifact:
    """A SmallCNN trained on labels alone: the teacher the demo compresses (skipped when already there)."""
    from kdtoolkit.config import LossConfig as LC
    from kdtoolkit.config import TrainConfig
    from kdtoolkit.data import load_data
    from kdtoolkit.distill.trainer import Trainer
    from kdtoolkit.evaluate import evaluate
    from kdtoolkit.models.loading import save_checkpoint
    from kdtoolkit.models.zoo import small_cnn
    from kdtoolkit.student.build import count_params

    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.05, loss=LC(name="ce"), augment="crop", seed=0)
    key = fsutil.stable_hash({"demo-teacher": 1, "train": cfg.model_dump(mode="json")})
    if Artifact.is_artifact(out_dir):
        art = Artifact.load(out_dir)
        if art.manifest.input_key == key and not art.verify():
            log(f"[demo-teacher] up to date, skipped ({out_dir})", enabled=progress)
            return art
    splits = load_data(DATASET)
    model = small_cnn(num_classes=10, in_channels=1)
    log(f"[demo-teacher] training a SmallCNN teacher on {DATASET} ({len(splits.train)} images)", enabled=progress)
    result = Trainer(cfg, out_dir.parent / ".work" / f"demo-teacher-{key[:12]}", progress=progress).fit(model, splits)
    r = evaluate(result["model"], splits.test, splits.spec)
    with ArtifactWriter(out_dir, kind="torch", stage="demo-teacher", config=cfg.model_dump(mode="json"), input_key=key) as w:
        recipe = {"arch": "small_cnn", "arch_kwargs": {"num_classes": 10, "in_channels": 1}, "transforms": []}
        save_checkpoint(w.path("model.pt"), result["model"], recipe, splits.spec.to_dict())
        w.metrics.update({"accuracy": r["accuracy"], "params": count_params(result["model"])})
        w.info.update({"model": splits.spec.to_dict(), "model_file": "model.pt", "recipe": recipe})
    return w.artifact


def run_demo(out: str | Path, *, progress: bool = True, epochs: int = 3) -> dict[str, Any]:
    from kdtoolkit.config import CompressConfig, DataConfig, MeasureConfig, StudentConfig, TrainConfig
    from kdtoolkit.pipeline import compress

    out = Path(out)
    teacher = train_teacher(out / "teacher", progress=progress)
    cfg = CompressConfig(
        model=str(teacher.path),
        data=DataConfig(source=DATASET),
        profile="ort-cpu",
        student=StudentConfig(separable=True, init="svd"),
        train=TrainConfig(epochs=epochs, batch_size=128, lr=0.05, augment="none", seed=0),
        measure=MeasureConfig(batches=[1, 64], iters=40),
    )
    return compress(cfg, out / "compress", progress=progress)
