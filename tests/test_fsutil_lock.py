"""The run lock, tested with real processes: a live holder refuses a second run, a killed one blocks nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kdtoolkit.errors import InputError
from kdtoolkit.fsutil import run_lock

# A child that takes the lock, says so on stdout, then holds it until killed or until `hold_s` ends.
_HOLDER = """
import sys, time
from kdtoolkit.fsutil import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _start_holder(run_dir: Path, hold_s: float = 60.0) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), str(hold_s)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the child holds the lock
    assert line.strip() == "locked", f"holder did not take the lock (got {line!r})"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_second_run_refuses_while_first_holds_the_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start_holder(run)
    try:
        with pytest.raises(InputError) as info:
            with run_lock(run):
                pass
        msg = str(info.value)
        assert "\n" not in msg
        assert f"run folder {run} is in use by another kdtoolkit process (pid {proc.pid}, started " in msg
        assert msg.endswith("wait for it or pass --wait")
    finally:
        _stop(proc)


def test_killed_holder_never_blocks_the_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start_holder(run)
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up runs: the lock file stays behind with its pid
    proc.wait(timeout=10)
    assert (run / ".lock").read_text().strip(), "the killed holder's stamp should still be in the file"
    with run_lock(run) as path:  # the kernel dropped the flock with the process
        assert str(os.getpid()) in path.read_text()


def test_wait_blocks_until_the_holder_finishes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start_holder(run, hold_s=1.5)
    told: list[str] = []
    try:
        t0 = time.monotonic()
        with run_lock(run, wait=True, poll_s=0.05, on_wait=told.append):
            waited = time.monotonic() - t0
            # granted only once the holder let go: it holds for 1.5 s after saying "locked", then exits (its exit
            # may trail the release by a moment on a loaded machine, so wait for it rather than poll once)
            assert proc.wait(timeout=10) == 0, "the holder did not finish cleanly"
        assert waited > 1.0, f"the lock was granted after {waited:.2f} s, while its holder still held it"
        assert len(told) == 1 and "waiting for it" in told[0] and f"pid {proc.pid}" in told[0]
    finally:
        _stop(proc)


def test_lock_is_released_on_exit_and_on_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with run_lock(run):
        pass
    with pytest.raises(RuntimeError):
        with run_lock(run):
            raise RuntimeError("stage failed")
    with run_lock(run):  # neither a normal exit nor an error leaves it held
        pass


def test_two_threads_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    """flock locks belong to the open file, so a second open in the same process is refused too."""
    run = tmp_path / "run"
    errors: list[str] = []
    with run_lock(run):
        def other() -> None:
            try:
                with run_lock(run):
                    pass
            except InputError as exc:
                errors.append(str(exc))
        t = threading.Thread(target=other)
        t.start()
        t.join(timeout=10)
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]
