"""`kdtoolkit report RUN_DIR`: rebuild report.md and report.html (with plots) from a compress run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtoolkit.cli import app


@app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="a compress run folder (holds summary.json)")]) -> None:
    """Rebuild report.md, report.html and the PNG plots from summary.json and the profile artifact."""
    from kdtoolkit.report import rebuild

    paths = rebuild(run_dir)
    for p in paths:
        typer.echo(str(p))
