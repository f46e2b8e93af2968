"""`vlm-steer export`: rewrite any readable SAE checkpoint in another library's layout."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from sae_modules.cli_errors import reported_errors
from sae_modules.formats.detect import load_sae
from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.native import save_sae
from sae_modules.formats.saelens import export_saelens
from sae_modules.formats.sparsify import export_sparsify


class ExportFormat(str, Enum):
    saelens = "saelens"
    sparsify = "sparsify"
    native = "native"


_WRITERS = {
    ExportFormat.saelens: export_saelens,
    ExportFormat.sparsify: export_sparsify,
    ExportFormat.native: save_sae,
}


def export(
    src: Annotated[
        str, typer.Argument(help="Checkpoint folder or ae*.pt file (any supported layout), or Hub id.")
    ],
    dst: Annotated[Path, typer.Argument(help="Directory to write.")],
    to: Annotated[ExportFormat, typer.Option("--to", help="Layout to write.")] = ExportFormat.saelens,
    subfolder: Annotated[
        str | None, typer.Option(help="Sub-folder of SRC holding the SAE (trainer_0, layers.22, ...).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing checkpoint at DST.")] = False,
) -> None:
    """Write SRC to DST in the chosen layout; a bad checkpoint exits 2, an I/O failure 1, with the reason."""
    with reported_errors({"dst": "DST"}, io_action=f"could not read {src} or write {dst}"):
        if dst.exists() and not overwrite:
            raise CheckpointError(f"{dst} exists; pass --overwrite to replace it", "dst")
        sae = load_sae(src, subfolder=subfolder)
        _WRITERS[to](sae, dst)
    typer.echo(
        f"wrote {sae.cfg.architecture} SAE ({sae.cfg.d_in} -> {sae.cfg.n_latents}) to {dst} as {to.value}"
    )
