import tarfile

import numpy as np
import pytest
from PIL import Image

from kdtoolkit.data import batches, load_data
from kdtoolkit.errors import InputError


def _folder(root, classes=("cat", "dog"), n=6, size=(12, 10), split=None):
    rng = np.random.default_rng(0)
    base = root / split if split else root
    for c in classes:
        (base / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(base / c / f"{i}.png")


def test_builtin_example_splits_are_disjoint_and_seeded():
    s = load_data("mnist-mini")
    assert (len(s.train), len(s.val), len(s.test)) == (9000, 1000, 2000)
    assert s.spec.input_size == (28, 28) and s.spec.channels == 1 and len(s.spec.classes) == 10
    again = load_data("mnist-mini")
    assert np.array_equal(s.val.y, again.val.y)
    # stratified validation: every class present
    assert set(np.unique(s.val.y)) == set(range(10))


def test_imagefolder_with_split_and_resize(tmp_path):
    _folder(tmp_path, split="train")
    _folder(tmp_path, split="val", n=3)
    s = load_data(str(tmp_path), input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert s.spec.classes == ["cat", "dog"] and s.train.x.shape[1:] == (8, 8, 3)
    assert len(s.test) == 6 and len(s.train) + len(s.val) == 12


def test_imagefolder_without_split_gets_seeded_split_and_grey_mapping(tmp_path):
    _folder(tmp_path, n=10)
    s = load_data(str(tmp_path), channels=1, test_fraction=0.2)
    assert len(s.test) == 4 and s.train.x.shape[-1] == 1
    assert s.spec.input_size == (12, 10)


def test_tar_gz_is_unpacked_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "src" / "ds", split="train")
    _folder(tmp_path / "src" / "ds", split="test", n=2)
    with tarfile.open(tmp_path / "ds.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src" / "ds", arcname="ds")
    s = load_data(str(tmp_path / "ds.tar.gz"))
    assert len(s.test) == 4
    assert len(list((tmp_path / "cache" / "extracted").iterdir())) == 1


def test_tar_gz_unpacked_by_two_runs_at_once_keeps_the_first_finished_copy(tmp_path, monkeypatch):
    """Two `compress` runs started together both unpack the archive; the one finishing second must not
    delete the copy the other is already reading (it did: a FileNotFoundError in the other run)."""
    import os

    from kdtoolkit import fsutil
    from kdtoolkit.data.datasets import _file_key, extract_archive

    monkeypatch.setenv("KDTOOLKIT_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "src" / "ds", split="train", n=2)
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "ds", arcname="ds")
    dest = tmp_path / "cache" / "extracted" / f"ds-{_file_key(archive)}"
    real = fsutil.extract_tar

    def the_other_run_finishes_first(path, into, *a, **k):
        real(path, into, *a, **k)
        other = tmp_path / "other"
        real(path, other, *a, **k)
        (other / ".complete").write_text("ok\n")
        (other / "being-read-by-the-other-run").write_text("")
        os.replace(other, dest)

    monkeypatch.setattr(fsutil, "extract_tar", the_other_run_finishes_first)
    assert extract_archive(archive) == dest
    assert (dest / "being-read-by-the-other-run").exists()  # the other run's copy is untouched
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # and our temp copy is gone
    assert sorted(p.name for p in (dest / "ds" / "train").iterdir()) == ["cat", "dog"]


def test_tar_gz_replaces_a_stale_unfinished_copy(tmp_path, monkeypatch):
    from kdtoolkit.data.datasets import _file_key, extract_archive

    monkeypatch.setenv("KDTOOLKIT_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "src" / "ds", split="train", n=2)
    archive = tmp_path / "ds.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "ds", arcname="ds")
    dest = tmp_path / "cache" / "extracted" / f"ds-{_file_key(archive)}"
    (dest / "ds").mkdir(parents=True)  # an older version's copy, cut short: no .complete
    (dest / "ds" / "half-written.png").write_bytes(b"")
    assert extract_archive(archive) == dest
    assert (dest / ".complete").exists() and not (dest / "ds" / "half-written.png").exists()
    assert sorted(p.name for p in (dest / "ds" / "train").iterdir()) == ["cat", "dog"]
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_npz_and_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (50, 8, 8), dtype=np.uint8), y_train=np.arange(50) % 5,
             x_test=rng.integers(0, 255, (10, 8, 8), dtype=np.uint8), y_test=np.arange(10) % 5)
    s = load_data(str(tmp_path / "d.npz"))
    assert len(s.spec.classes) == 5 and s.train.x.shape[-1] == 1
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(InputError, match="x_train and y_train"):
        load_data(str(tmp_path / "bad.npz"))
    with pytest.raises(InputError, match="data not found"):
        load_data(str(tmp_path / "nope"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="no images found"):
        load_data(str(tmp_path / "empty"))


def test_corrupt_image_fails_with_name_or_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "d", n=5)
    (tmp_path / "d" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(InputError, match="broken.jpg"):
        load_data(str(tmp_path / "d"))
    s = load_data(str(tmp_path / "d"), on_bad_image="skip")
    assert len(s.train) + len(s.val) + len(s.test) == 10


def test_batches_are_reproducible_and_resume_mid_epoch():
    s = load_data("mnist-mini", train_limit=600)
    full = list(batches(s.train, s.spec, 64, shuffle=True, seed=3, epoch=1, augment="crop_flip", drop_last=True))
    tail = list(batches(s.train, s.spec, 64, shuffle=True, seed=3, epoch=1, augment="crop_flip", drop_last=True, start_batch=4))
    assert len(tail) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], tail):
        assert np.array_equal(ya.numpy(), yb.numpy()) and np.allclose(xa.numpy(), xb.numpy())


def test_measured_statistics_sample_every_class_not_the_first_images(tmp_path):
    # class-sorted like an ImageFolder: 6,000 black images of class 0, then 6,000 white of class 1.
    # The first 5,000 alone would give mean 0 and a zero std; a random sample across classes gives ~0.5.
    n = 6000
    x = np.concatenate([np.zeros((n, 4, 4), np.uint8), np.full((n, 4, 4), 255, np.uint8)])
    y = np.repeat([0, 1], n)
    np.savez(tmp_path / "sorted.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    s = load_data(str(tmp_path / "sorted.npz"))
    assert s.spec.mean[0] == pytest.approx(0.5, abs=0.03) and s.spec.std[0] == pytest.approx(0.5, abs=0.03)
    again = load_data(str(tmp_path / "sorted.npz"))
    assert again.spec.mean == s.spec.mean  # seeded: the same sample every time


def test_measure_stats_of_a_constant_channel_stays_finite():
    from kdtoolkit.data.datasets import ArrayData, measure_stats

    mean, std = measure_stats(ArrayData(np.full((20, 3, 3, 1), 51, np.uint8), np.zeros(20, np.int64)))
    assert mean[0] == pytest.approx(0.2) and std == (1.0,)


def test_a_bad_first_image_is_passed_over_with_skip_and_an_unreadable_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KDTOOLKIT_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "d", n=5)
    first = sorted((tmp_path / "d").iterdir())[0]
    (first / "0000_broken.jpg").write_bytes(b"not an image")  # sorts first: the image size was read from it
    with pytest.raises(InputError, match="0000_broken.jpg: cannot read image .*--on-bad-image skip"):
        load_data(str(tmp_path / "d"))
    s = load_data(str(tmp_path / "d"), on_bad_image="skip")
    assert len(s.train) + len(s.val) + len(s.test) == 10
    for f in (tmp_path / "d").rglob("*.*"):
        f.write_bytes(b"garbage")
    with pytest.raises(InputError, match="none of its 11 image files could be read"):
        load_data(str(tmp_path / "d"), on_bad_image="skip")
