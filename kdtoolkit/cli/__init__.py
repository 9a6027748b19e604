"""The `kdtoolkit` command: a thin Typer layer over the library.

Errors a user can cause print one line on stderr and exit non-zero (2 input, 1 check failed,
3 missing dependency, 4 training diverged); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="kdtoolkit",
    help="Distill, quantize, export, build and profile PyTorch models for a target device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from kdtoolkit import __version__

        typer.echo(f"kdtoolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks instead of one-line errors"),
) -> None:
    """kdtoolkit: teacher -> student -> distill -> export -> build -> profile -> bundle."""


def _register() -> None:
    """Import the command modules (each registers its commands), in the order `--help` lists them."""
    import importlib

    for name in ("bundle", "compress", "info", "stages",  # bundle, verify, compress, demo, info, student, export
                 "quantize", "engine",  # quantize; check, build
                 "gate", "profile", "report",  # profiling, CI gate, reports
                 "train", "adapter"):  # distill, finetune; adapter merge
        importlib.import_module(f"kdtoolkit.cli.{name}")


_register()


RESUMABLE = ("compress", "distill", "finetune", "demo")  # the commands that keep stages or training checkpoints


def _command() -> str:
    return next((a for a in sys.argv[1:] if not a.startswith("-")), "")


def _interrupted() -> None:
    more = ": what finished is kept (stages, training checkpoints); rerun the same command to resume" if _command() in RESUMABLE else ""
    typer.echo(f"interrupted{more}", err=True)
    sys.exit(130)


def main() -> None:
    """Run the app; Typer handles usage errors (exit 2), --help and exit codes, we map our own errors."""
    from kdtoolkit.errors import KdtError

    debug = "--debug" in sys.argv[1:]
    if not debug:
        import warnings

        warnings.simplefilter("ignore")  # exporter/tracer chatter buries the one line users need
    try:
        app(prog_name="kdtoolkit")
    except KdtError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:  # Typer turns Ctrl-C into a silent exit 130 before it reaches the clause above
        if exc.code == 130:
            _interrupted()
        raise
    except Exception as exc:  # an unexpected bug: still one line, with a way to see more
        if debug:
            raise
        if type(exc).__module__.startswith("pydantic") and type(exc).__name__ == "ValidationError":
            from kdtoolkit.cli.options import validation_line

            typer.echo(f"error: {validation_line(exc)}", err=True)  # a config built from flags: bad input, not a bug
            sys.exit(2)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        typer.echo(f"error: unexpected {type(exc).__name__}: {first[:400]} (rerun with --debug for the traceback)", err=True)
        sys.exit(2 if _command() == "gate" else 1)  # gate's 1 means "regression": a failure to measure is not one
