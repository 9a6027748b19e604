"""Progress: rich bars on a terminal, plain timestamped lines when not (CI logs)."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``with Progress("train", total) as p: p.advance(1, loss=...)``; quiet when ``enabled`` is False."""

    def __init__(self, desc: str, total: int | None, *, enabled: bool = True, every_s: float = 10.0) -> None:
        self.desc, self.total, self.enabled, self.every_s = desc, total, enabled, every_s
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._rich = None
        self._last = 0.0
        self._t0 = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RP

            self._rich = RP(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total, info="")
        return self

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())
        if self._rich is not None:
            self._rich.update(self._task, advance=n, info=info)
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last >= self.every_s or (self.total and self.done >= self.total):
                self._last = now
                tot = f"/{self.total}" if self.total else ""
                print(f"[{now - self._t0:7.1f}s] {self.desc}: {self.done}{tot} {info}", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.stop()


def log(msg: str, *, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
