"""`python -m sae_modules.taxa.build` (`make taxa-tower`): train the taxa tower and write it with its manifest."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from sae_modules.atomic_file import atomic_write_text
from sae_modules.taxa import TAXA_ASSETS_DIR
from sae_modules.taxa.tower import TowerRecipe, save_tower, train_tower

MANIFEST_FORMAT = "vlm-steer-taxa/1"

app = typer.Typer(add_completion=False, help=__doc__)


def build(out: Path, recipe: TowerRecipe, progress: bool = True) -> dict:
    """Train, write `out/tower/` and `out/MANIFEST.json` (recipe and held-out accuracy); returns the manifest."""
    started = time.perf_counter()
    tower, heads, figures = train_tower(recipe, progress=progress)
    save_tower(tower, heads, recipe, out / "tower")
    manifest = {"format": MANIFEST_FORMAT, "command": "make taxa-tower", "recipe": asdict(recipe),
                "figures": figures, "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out / "MANIFEST.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Folder for tower/ and MANIFEST.json.")] = TAXA_ASSETS_DIR,
    seed: Annotated[int, typer.Option(help="Seed of the tower's initial weights and training images.")] = 0,
    tiny: Annotated[bool, typer.Option(help="Toy sizes: proves the build runs, not that it learns.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train the taxa tower deterministically and write it with its manifest."""
    recipe = TowerRecipe.tiny() if tiny else TowerRecipe(seed=seed)
    manifest = build(out, recipe, progress=progress)
    typer.echo(json.dumps({"figures": manifest["figures"], "seconds": manifest["seconds"]}, indent=2))


if __name__ == "__main__":
    app()
