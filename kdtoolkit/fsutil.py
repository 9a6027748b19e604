"""Atomic file writes: a temp file in the same folder, fsync, then rename. Nothing half written survives."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)
    return Path(path)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """Content hash of a JSON-able object (sorted keys), used to decide whether a stage can be skipped."""
    data = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def extract_tar(path: str | os.PathLike[str], into: str | os.PathLike[str], what: str = "archive") -> None:
    """Unpack a tar(.gz) with the safe 'data' filter; a broken archive is one clear InputError.

    The compressed stream is read to its end: tarfile stops at the end-of-archive blocks, before gzip's CRC, so a
    damaged archive could otherwise unpack without an error and with wrong content."""
    import tarfile
    import zlib

    from kdtoolkit.errors import InputError

    try:
        with tarfile.open(path) as tf:
            tf.extractall(into, filter="data")
            if tf.fileobj is not None:
                while tf.fileobj.read(1 << 20):
                    pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        shutil.rmtree(into, ignore_errors=True)
        raise InputError(f"{path}: cannot unpack {what} ({exc})") from None


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a finished temp folder into place; an older folder of that name is removed only after."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


LOCK_NAME = ".lock"


def _lock_holder(fh: Any) -> str:
    """Who holds the lock, from what the holder wrote into the lock file (best effort)."""
    try:
        fh.seek(0)
        info = json.loads(fh.read() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "pid unknown"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {info['pid']}{where}, started {info.get('started', '?')}"


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str], *, wait: bool = False, poll_s: float = 0.5,
             on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on a run folder so two runs never work in it at once.

    ``fcntl.flock`` on ``RUN/.lock``: the kernel drops it when its holder exits or is killed, so a
    lock left by a killed run never blocks that run's resume (no stale-lock clean-up needed). The
    file keeps the holder's pid, host and start time only to name them in the refusal. With
    ``wait`` the call blocks until the holder finishes (``on_wait`` is told once who it waits for).
    Where the filesystem has no flock (some network mounts), the run goes ahead unlocked.
    """
    import fcntl
    import time

    from kdtoolkit.errors import InputError

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fh = open(path, "a+")  # noqa: SIM115 (held open for the lifetime of the lock)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(fh)
                if not wait:
                    raise InputError(f"run folder {run_dir} is in use by another kdtoolkit process ({holder}); "
                                     "wait for it or pass --wait") from None
                if on_wait is not None and not told:
                    on_wait(f"run folder {run_dir} is in use by another kdtoolkit process ({holder}); waiting for it")
                    told = True
                time.sleep(poll_s)
            except OSError:
                break  # no flock on this filesystem: run unlocked rather than refuse every run
        stamp = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(stamp) + "\n")
        fh.flush()
        yield path
    finally:
        fh.close()  # closing the descriptor releases the flock
