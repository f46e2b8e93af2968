"""`python -m sae_modules.shapes.cli`: rebuild the demo CLIP, LLaVA, SAE and example images (`make demo-model`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from sae_modules.shapes import ASSETS_DIR
from sae_modules.shapes.manifest import ManifestError
from sae_modules.shapes.rebuild import rebuild, rebuild_clip, rebuild_sae
from sae_modules.shapes.recipe import Recipe
from sae_modules.shapes.world import write_examples

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    out: Annotated[Path, typer.Option(help="Folder for clip/, model/, sae/ and MANIFEST.json.")] = ASSETS_DIR,
    seed: Annotated[int, typer.Option(help="Seed of every stage.")] = 0,
    tiny: Annotated[
        bool, typer.Option(help="Toy sizes: proves the pipeline runs, not that it learns.")
    ] = False,
    eval_images: Annotated[int, typer.Option(min=1, help="Held-out images for the accuracy figures.")] = 200,
    examples: Annotated[
        Path | None, typer.Option(help="Also write the example images into this folder.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    clip_only: Annotated[
        bool,
        typer.Option(help="Rerun stage 1 only: add clip/ to existing assets built with the same recipe."),
    ] = False,
    sae_only: Annotated[
        bool,
        typer.Option(
            help="Rerun stage 4 only: retrain sae/ on the existing model (only sae_* settings may change)."
        ),
    ] = False,
) -> None:
    """Train the demo CLIP, model and SAE deterministically and write their manifest."""
    recipe = Recipe.tiny(seed) if tiny else Recipe(seed=seed)
    if clip_only and sae_only:
        typer.echo("error: give at most one of --clip-only and --sae-only", err=True)
        raise typer.Exit(2)
    if clip_only or sae_only:
        try:
            record = (rebuild_clip if clip_only else rebuild_sae)(out, recipe, progress=progress)
        except ManifestError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        key = "clip_rebuild" if clip_only else "sae_rebuild"
        typer.echo(json.dumps({key: record[key], **({} if clip_only else {"sae": record["sae"]})}, indent=2))
        return
    record = rebuild(out, recipe, eval_images=eval_images, progress=progress)
    if examples is not None:
        write_examples(examples)
    typer.echo(json.dumps({"accuracy": record["accuracy"], "seconds": record["seconds"]}, indent=2))


if __name__ == "__main__":
    app()
