"""`vlm-steer extract`: the command-line face of the extraction job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sae_modules.activations.blocks import LAST_LAYER
from sae_modules.activations.errors import ExtractError
from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import DatasetImages, FolderImages, ImageSource
from sae_modules.activations.tokens import SPEC_HELP, TokenSelection
from sae_modules.activations.towers import load_tower, parse_layer
from sae_modules.cli_errors import reported_errors

_DTYPES = ("float32", "float16", "bfloat16")


def image_source(
    images: Path | None, dataset: Path | None, image_column: str, label_column: str | None, split: str | None
) -> ImageSource:
    """Exactly one of --images and --dataset."""
    if (images is None) == (dataset is None):
        raise ExtractError("give exactly one of --images DIR and --dataset PATH")
    if images is not None:
        return FolderImages(images)
    return DatasetImages(dataset, image_column=image_column, label_column=label_column, split=split)


def extract(
    model: Annotated[
        str, typer.Option(help="Hub id or local checkpoint (CLIP, CLIPVision, LLaVA), or open_clip:NAME.")
    ],
    layer: Annotated[
        str,
        typer.Option(
            help="Block index, negative from the end (LLaVA-1.5 reads -2), or 'last': the image embedding, "
            "one vector per image (CLIP's visual projection; a tower without one gives its pooled output)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Shard directory; rerunning resumes an unfinished run.")],
    images: Annotated[
        Path | None, typer.Option(help="Image folder (recursive; subfolders are labels).")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="A datasets dataset written with save_to_disk.")
    ] = None,
    image_column: Annotated[str, typer.Option(help="Dataset column holding images.")] = "image",
    label_column: Annotated[str | None, typer.Option(help="Dataset column holding labels.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of a saved DatasetDict.")] = None,
    weights: Annotated[
        Path | None, typer.Option(help="open_clip weights (.safetensors or state dict).")
    ] = None,
    tokens: Annotated[
        str | None, typer.Option(help=f"{SPEC_HELP}; default random:2 at a block, cls (the one vector) at 'last'.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    shard_size: Annotated[int, typer.Option(help="Vectors per shard file.")] = 65536,
    dtype: Annotated[str, typer.Option(help="Stored dtype: float32, float16, bfloat16.")] = "float32",
    seed: Annotated[int, typer.Option(help="Seed of random token picks (per image).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    ray: Annotated[
        bool, typer.Option("--ray", help="Run on a Ray actor pool (one model per actor).")
    ] = False,
    workers: Annotated[int, typer.Option(help="Ray actors (with --ray); one GPU each when GPUs exist.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Extract one tower layer's activations from images into safetensors shards."""
    console = Console(stderr=True)
    with reported_errors():
        if dtype not in _DTYPES:
            raise ExtractError(f"--dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
        try:
            block = parse_layer(layer)
        except ValueError as err:
            raise ExtractError(f"--layer: {err}") from None
        if tokens is None:
            tokens = "cls" if block == LAST_LAYER else "random:2"
        plan = ExtractionPlan(
            model=model,
            layer=block,
            tokens=TokenSelection.parse(tokens),
            dtype=dtype,  # type: ignore[arg-type]
            seed=seed,
            batch_size=batch_size,
            shard_size=shard_size,
        )
        source = image_source(images, dataset, image_column, label_column, split)
        weights_file = str(weights) if weights else None
        if ray:
            from sae_modules.activations.ray_extract import run_ray_extraction

            manifest = run_ray_extraction(model, weights_file, device, source, out, plan, workers, progress)
        else:
            manifest = run_extraction(load_tower(model, weights_file, device), source, out, plan, progress)
    console.print(
        f"{manifest.count} vectors of dim {manifest.d_in} from {len(manifest.images)} images "
        f"in {len(manifest.shards)} shards -> {out}",
        highlight=False,
    )
