"""Errors users see as one line on stderr with a distinct exit code (no traceback unless --debug)."""

from __future__ import annotations


class KdtError(Exception):
    """An expected failure: bad input, a missing dependency, a check that failed.

    The CLI prints ``str(err)`` on one line and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(KdtError):
    """The user gave a file, flag or config that cannot be used (exit 2)."""


class MissingDependency(KdtError):
    """An optional library is needed for what was asked (exit 3)."""

    exit_code = 3


class CheckFailed(KdtError):
    """A verification, gate or compatibility check found a real problem (exit 1)."""

    exit_code = 1


class TrainingDiverged(KdtError):
    """Loss became NaN/inf; the last good checkpoint is kept (exit 4)."""

    exit_code = 4


def lazy_import(module: str, *, extra: str | None = None, purpose: str = ""):
    """Import an optional heavy module, or raise an actionable MissingDependency (Polygraphy style)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'kdtoolkit[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        why = f" for {purpose}" if purpose else ""
        raise MissingDependency(f"{module} is needed{why} but could not be imported ({exc}); install it: {hint}") from exc
