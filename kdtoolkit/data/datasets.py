"""Datasets as decoded uint8 arrays (N, H, W, C) with labels, split and batched in torch.

Decoding images once into arrays (cached on disk for folders) and augmenting whole batches
in torch keeps 2-core training fed; a per-image Python pipeline costs more than the student's
training step at 32x32. Splits follow DESIGN.md: validation is carved from train with a seed,
the test split is only for final figures, an unsplit folder is split with a seed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdtoolkit.errors import InputError

if TYPE_CHECKING:
    from kdtoolkit.data.inputspec import InputSpec

BUILTIN = {"mnist-mini": Path(__file__).parent / "assets" / "mnist_mini.npz"}
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class DataSpec:
    """What the model's input is: recorded in every manifest and the bundle."""

    source: str
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    layout: str = "NCHW"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "input_size": list(self.input_size), "channels": self.channels,
            "mean": list(self.mean), "std": list(self.std), "classes": list(self.classes), "layout": self.layout,
            "value_range": "RGB or grey in [0, 1] before normalisation",
        }


@dataclass
class ArrayData:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray  # int64 (N,)
    name: str = ""
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray, name: str | None = None) -> ArrayData:
        files = [self.files[i] for i in idx] if self.files else []
        return ArrayData(self.x[idx], self.y[idx], name or self.name, files)


@dataclass
class Splits:
    train: ArrayData
    val: ArrayData
    test: ArrayData
    spec: DataSpec
    input: InputSpec | None = None  # the resolved input with each field's source (set by inputspec.load_splits)


def cache_dir() -> Path:
    root = Path(os.environ.get("KDTOOLKIT_CACHE", Path.home() / ".cache" / "kdtoolkit"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def extract_archive(path: Path) -> Path:
    """Unpack a .tar.gz once into the cache (atomically: a partial extraction is never reused).

    Two runs may unpack the same archive at once (two `compress` jobs started together): the one
    that finishes second keeps the first one's finished copy, which the other is already reading,
    and discards its own."""
    dest = cache_dir() / "extracted" / f"{path.name.split('.')[0]}-{_file_key(path)}"
    if (dest / ".complete").exists():
        return dest
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    from kdtoolkit.fsutil import extract_tar, replace_dir

    try:
        extract_tar(path, tmp)
        (tmp / ".complete").write_text("ok\n")
    except BaseException:  # Ctrl-C included: no half-unpacked folder is left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, dest)  # atomic, and refused while another run's folder is in place
        return dest
    except OSError:
        pass
    if (dest / ".complete").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return dest
    replace_dir(tmp, dest)  # only a stale, unfinished copy is moved aside
    return dest


def _find_root(root: Path) -> Path:
    """An archive often wraps its ImageFolder in one top folder: descend through single folders."""
    while True:
        subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
        if len(subs) == 1 and not files:
            root = subs[0]
        else:
            return root


def _list_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if f.suffix.lower() in IMG_EXT and f.is_file():
                items.append((str(f), ci))
    return classes, items


def _decode(args: tuple[str, tuple[int, int] | None, int]) -> np.ndarray | str:
    path, size, channels = args
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for a corrupt file
        return f"{type(exc).__name__}: {exc}"
    return a[..., None] if a.ndim == 2 else a


def _decode_folder(root: Path, classes: list[str], items: list[tuple[str, int]], size: tuple[int, int] | None,
                   channels: int, on_bad_image: str, name: str) -> ArrayData:
    if not items:
        raise InputError(f"{root}: no images found (looked for {', '.join(IMG_EXT)} under one folder per class)")
    # every file's size and mtime are in the key: an image replaced under the same name must not come back from the cache
    h = hashlib.sha256(repr((str(root.resolve()), len(items), size, channels, on_bad_image)).encode())
    for path, label in items:
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:  # gone since the listing: decoding it fails (or skips) with its name, like any bad file
            stamp = "missing"
        h.update(f"{path}\0{label}\0{stamp}\n".encode())
    key = h.hexdigest()[:16]
    cache = cache_dir() / "decoded" / f"{root.name}-{key}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return ArrayData(z["x"], z["y"], name, list(z["files"]))
    if size is None:  # the images' own size: the first readable one's (with skip, a bad first file is passed over)
        for path, _ in items:
            first = _decode((path, None, channels))
            if not isinstance(first, str):
                size = first.shape[:2]
                break
            if on_bad_image != "skip":
                raise InputError(f"{path}: cannot read image ({first}); pass --on-bad-image skip to leave such files out")
        else:
            raise InputError(f"{root}: none of its {len(items)} image files could be read")
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(p, size, channels) for p, _ in items]
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as ex:
        decoded = list(ex.map(_decode, jobs, chunksize=256))
    xs, ys, files = [], [], []
    for (path, label), img in zip(items, decoded):
        if isinstance(img, str):
            if on_bad_image == "skip":
                continue
            raise InputError(f"{path}: cannot read image ({img}); pass --on-bad-image skip to leave such files out")
        xs.append(img)
        ys.append(label)
        files.append(path)
    if not xs:
        raise InputError(f"{root}: none of its {len(items)} image files could be read")
    x = np.stack(xs)
    y = np.asarray(ys, dtype=np.int64)
    from kdtoolkit import fsutil

    cache.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_path(cache, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, x=x, y=y, files=np.asarray(files))
    return ArrayData(x, y, name, files)


def _from_npz(path: Path) -> tuple[ArrayData, ArrayData | None, list[str]]:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npz ({exc})") from None
    need = {"x_train", "y_train"}
    if not need <= set(z.files):
        raise InputError(f"{path}: an .npz needs x_train and y_train (and x_test, y_test); it has {', '.join(z.files)}")

    def arr(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3):
            x = x.transpose(0, 2, 3, 1)
        if x.dtype != np.uint8:
            x = np.clip(x * (255.0 if x.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return x

    train = ArrayData(arr(z["x_train"]), z["y_train"].astype(np.int64).reshape(-1), "train")
    test = ArrayData(arr(z["x_test"]), z["y_test"].astype(np.int64).reshape(-1), "test") if "x_test" in z.files else None
    n = int(max(train.y.max(), test.y.max() if test is not None else 0)) + 1
    classes = [str(c) for c in z["class_names"]] if "class_names" in z.files else [str(i) for i in range(n)]
    return train, test, classes


def _map_images(d: ArrayData, size: tuple[int, int], channels: int) -> ArrayData:
    """Resize and channel-map an array dataset to the model's input."""
    x = d.x
    if x.shape[-1] != channels:
        if channels == 3 and x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        elif channels == 1 and x.shape[-1] == 3:
            x = (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].round().astype(np.uint8)
        else:
            raise InputError(f"cannot map {x.shape[-1]}-channel images to a {channels}-channel model input")
    if tuple(x.shape[1:3]) != tuple(size):
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        x = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return ArrayData(np.ascontiguousarray(x), d.y, d.name, d.files)


def _seeded_split(d: ArrayData, fraction: float, seed: int, names: tuple[str, str]) -> tuple[ArrayData, ArrayData]:
    """Stratified split so each class keeps its share in both parts."""
    rng = np.random.default_rng(seed)
    take = []
    for c in np.unique(d.y):
        idx = np.where(d.y == c)[0]
        rng.shuffle(idx)
        take.append(idx[: max(1, int(round(len(idx) * fraction)))] if len(idx) > 1 else idx[:0])
    held = np.sort(np.concatenate(take))
    mask = np.ones(len(d), bool)
    mask[held] = False
    return d.subset(np.where(mask)[0], names[0]), d.subset(held, names[1])


def _limit(d: ArrayData, n: int | None, seed: int) -> ArrayData:
    if n is None or n >= len(d):
        return d
    rng = np.random.default_rng(seed)
    return d.subset(np.sort(rng.choice(len(d), n, replace=False)))


def measure_stats(d: ArrayData, n: int = 5000, seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] from a seeded random sample of ``n`` images.

    Random, not the first ``n``: a class-sorted folder's first 5,000 images are one class (CIFAR-10's
    airplanes gave mean 0.52,0.55,0.57 where the data's is 0.49,0.48,0.45).
    """
    idx = np.arange(len(d))
    if len(d) > n:
        idx = np.sort(np.random.default_rng([seed, 7]).choice(len(d), n, replace=False))
    total = np.zeros(d.x.shape[-1], np.float64)
    sq = np.zeros_like(total)
    count = 0
    for i in range(0, len(idx), 1000):  # in chunks: a float copy of 5,000 224x224 images is 3 GB
        xf = d.x[idx[i:i + 1000]].astype(np.float64) / 255.0
        total += xf.sum(axis=(0, 1, 2))
        sq += (xf * xf).sum(axis=(0, 1, 2))
        count += xf.shape[0] * xf.shape[1] * xf.shape[2]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(sq / max(count, 1) - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel carries nothing; dividing by 1 keeps it finite
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def load_data(
    source: str,
    *,
    input_size: tuple[int, int] | None = None,
    channels: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    class_names: list[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    on_bad_image: str = "fail",
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> Splits:
    """Load a dataset by path or built-in name, split it, and map images to the model's input."""
    from kdtoolkit.config import BAD_IMAGE_CHOICES

    if on_bad_image not in BAD_IMAGE_CHOICES:  # anything but "skip" would otherwise act as "fail"
        raise InputError(f"--on-bad-image must be fail or skip, got {on_bad_image!r}")
    if source in BUILTIN:
        path = BUILTIN[source]
    else:
        path = Path(source)
        if not path.exists():
            known = ", ".join(BUILTIN)
            raise InputError(f"data not found: {source} (give an ImageFolder, a .tar.gz of one, an .npz, or a built-in name: {known})")
    test: ArrayData | None
    if path.is_file() and path.suffix == ".npz":
        train, test, classes = _from_npz(path)
    else:
        if path.is_file():
            if not (path.name.endswith((".tar.gz", ".tgz", ".tar"))):
                raise InputError(f"{path}: unsupported data file (use a folder, .tar.gz, or .npz)")
            path = extract_archive(path)
        root = _find_root(path)
        split_dirs = {p.name: p for p in root.iterdir() if p.is_dir()}
        ch = channels or 3
        if "train" in split_dirs and ({"test", "val"} & set(split_dirs)):
            test_dir = split_dirs.get("test") or split_dirs["val"]
            classes, tr_items = _list_folder(split_dirs["train"])
            te_classes, te_items = _list_folder(test_dir)
            if te_classes != classes:
                raise InputError(f"{root}: train and {test_dir.name} have different class folders")
            train = _decode_folder(split_dirs["train"], classes, tr_items, input_size, ch, on_bad_image, "train")
            test = _decode_folder(test_dir, classes, te_items, tuple(train.x.shape[1:3]), ch, on_bad_image, "test")
        else:
            classes, items = _list_folder(root)
            full = _decode_folder(root, classes, items, input_size, ch, on_bad_image, "all")
            train, test = _seeded_split(full, test_fraction, seed + 1, ("train", "test"))
    if test is None:
        train, test = _seeded_split(train, test_fraction, seed + 1, ("train", "test"))
    if len(train) == 0:
        raise InputError(f"{source}: the training split is empty")
    train = _limit(train, train_limit, seed)
    test = _limit(test, test_limit, seed + 2)
    ch = channels or train.x.shape[-1]
    size = tuple(input_size) if input_size else tuple(train.x.shape[1:3])
    train, test = _map_images(train, size, ch), _map_images(test, size, ch)
    if class_names:
        if len(class_names) != len(classes):
            raise InputError(f"--class-names gives {len(class_names)} names but the data has {len(classes)} classes")
        classes = list(class_names)
    train, val = _seeded_split(train, val_fraction, seed, ("train", "val"))
    if mean is None or std is None:
        m, s = measure_stats(train, seed=seed)
        mean, std = mean or m, std or s
    if len(mean) != ch or len(std) != ch:
        raise InputError(f"mean/std need {ch} values (one per channel), got {len(mean)} and {len(std)}")
    spec = DataSpec(str(source), (int(size[0]), int(size[1])), int(ch), tuple(mean), tuple(std), classes)
    return Splits(train, val, test, spec)


def to_tensor(x: np.ndarray, spec: DataSpec):
    """uint8 NHWC -> normalised float NCHW tensor."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    return (t - mean) / std


def augment_batch(x, generator, mode: str = "crop_flip", pad: int = 4):
    """Random crop with reflect padding and/or horizontal flip on a whole batch (the CIFAR recipe).

    The random draws are the same for every mode, so skipping batches on resume stays aligned.
    """
    import torch

    n = x.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return apply_augment(x, dy, dx, flip, mode, pad)


def apply_augment(x, dy, dx, flip, mode: str = "crop_flip", pad: int = 4):
    """Crop offsets ``dy, dx`` (in the reflect-padded image) and flips given per sample: the same draw, replayed."""
    import torch
    import torch.nn.functional as F

    h, w = x.shape[2:]
    if mode in ("crop", "crop_flip"):
        x = _crop(F.pad(x, (pad, pad, pad, pad), mode="reflect"), dy, dx, h, w)
    if mode in ("flip", "crop_flip"):
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def _crop(xp, dy, dx, h: int, w: int):
    import torch

    n, c = xp.shape[:2]
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    rows = (dy[:, None] + ar_h[None, :])  # n, h
    cols = (dx[:, None] + ar_w[None, :])  # n, w
    idx_n = torch.arange(n)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # n, h, w, c
    return out.permute(0, 3, 1, 2).contiguous()


def batches(
    data: ArrayData,
    spec: DataSpec,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    augment: str = "none",
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    with_index: bool = False,
    start_batch: int = 0,
) -> Iterator[tuple[Any, ...]]:
    """Yield (x, y[, idx]) tensors; order is a pure function of (seed, epoch) so a resumed epoch replays it."""
    import torch

    n = len(data)
    order = np.arange(n)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(n)
    if world_size > 1:
        per = n // world_size
        order = order[: per * world_size]
        # contiguous shards of each global batch, so N ranks x B/N equals one process with batch B
        gb = batch_size * world_size
        nb = len(order) // gb if drop_last else -(-len(order) // gb)
        shards = [order[i * gb:(i + 1) * gb][rank * batch_size:(rank + 1) * batch_size] for i in range(nb)]
        chunks = [s for s in shards if len(s)]
    else:
        stop = (n // batch_size) * batch_size if drop_last else n
        chunks = [order[i:i + batch_size] for i in range(0, stop, batch_size)]
    gen = torch.Generator().manual_seed(hash((seed, epoch, rank)) & 0x7FFFFFFF)
    for bi, idx in enumerate(chunks):
        if bi < start_batch:
            if augment != "none":
                augment_batch(torch.zeros(len(idx), 1, 8, 8), gen, augment)
            continue
        x = to_tensor(data.x[idx], spec)
        if augment != "none":
            x = augment_batch(x, gen, augment)
        y = torch.from_numpy(data.y[idx])
        yield (x, y, torch.from_numpy(idx)) if with_index else (x, y)
