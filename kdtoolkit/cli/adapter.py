"""`kdtoolkit adapter merge`: a saved peft adapter applied to its base model and merged, for export.

`finetune --adapter` already writes the merged model beside the adapter; this command is for the adapter alone
(shipped small, kept apart from the base), so the base can be merged with it again anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtoolkit.cli import app
from kdtoolkit.cli.options import Arch, JsonOut, ModelArg, Out, TrustPickle

adapter_app = typer.Typer(help="Work with saved peft adapters (from finetune --adapter).", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")


@adapter_app.command("merge")
def merge_cmd(
    base: ModelArg,
    adapter_dir: Annotated[Path, typer.Argument(help="a finetune --adapter output folder or its adapter/ folder")],
    out: Out,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    json_out: JsonOut = None,
) -> None:
    """Apply ADAPTER_DIR to BASE (the exact model it was trained on: sha256 checked) and write the merged model to OUT."""
    from kdtoolkit import fsutil
    from kdtoolkit.adapters import merge_saved

    art = merge_saved(base, adapter_dir, out, arch=arch, trust_pickle=trust_pickle)
    if json_out:
        fsutil.write_json(json_out, {"artifact": str(out), **art.metrics})
    d = art.metrics.get("merge_max_abs_diff")
    typer.echo(f"wrote {out / 'model.pt'} (adapter merged" + (f"; max |logit diff| {d:.2e} against the adapted model)" if d is not None else ")"))
