"""The extraction job: images -> tower block output -> selected tokens -> shards, resumable.

The vector stream is a deterministic function of (images, model, layer, tokens, seed), and the
shard writer keeps only whole, hashed shards. A rerun therefore restarts at the batch holding
the last image on disk and drops the rows it already has, which reproduces the uninterrupted
run exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from torch import Tensor
from tqdm import tqdm

from sae_modules.activations.blocks import LAST_LAYER, Layer
from sae_modules.activations.errors import ExtractError
from sae_modules.activations.images import ImageSource, UnreadableImage
from sae_modules.activations.shards import DType, ShardManifest, ShardWriter
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import Tower

Rows = tuple[Tensor, Tensor, Tensor]


@dataclass
class ExtractionPlan:
    """Everything that decides the rows on disk; a rerun must match it to resume."""

    model: str
    layer: Layer
    tokens: TokenSelection
    dtype: DType = "float32"
    seed: int = 0
    batch_size: int = 32
    shard_size: int = 65536

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ExtractError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.layer == LAST_LAYER and self.tokens.mode not in ("cls", "all"):
            raise ExtractError(
                f"--tokens: the image embedding (--layer last) is one vector per image; {self.tokens} "
                "picks patches it does not have (give cls, or leave --tokens unset)"
            )


def open_writer(plan: ExtractionPlan, tower: Tower, source: ImageSource, out: Path) -> ShardWriter:
    """The writer for `out`, resuming it when it holds an unfinished run of the same plan."""
    plan.tokens.per_image(tower.tokens_at(plan.layer))
    manifest = ShardManifest(
        model=plan.model,
        layer=tower.block_index(plan.layer),
        tokens=str(plan.tokens),
        d_in=tower.width_at(plan.layer),
        dtype=plan.dtype,
        images=source.ids,
        labels=source.labels,
        seed=plan.seed,
    )
    return ShardWriter(out, manifest, plan.shard_size)


def batch_starts(writer: ShardWriter, n_images: int, batch_size: int) -> tuple[range, int, int]:
    """(batch start indices still to run, resume image, rows of it already on disk).

    Batches stay aligned with an uninterrupted run so every image is computed in the same batch
    as before, which keeps resumed rows bit-identical.
    """
    image, done = writer.resume_position()
    first = image // batch_size * batch_size
    return range(first, n_images, batch_size), image, done


def drop_written(rows: Rows, resume_image: int, done: int) -> Rows:
    """Drop rows already on disk: those of images before `resume_image` and its first `done` rows."""
    _, image_index, _ = rows
    skip = int((image_index < resume_image).sum()) + min(done, int((image_index == resume_image).sum()))
    return tuple(t[skip:] for t in rows)  # type: ignore[return-value]


def load_batch(source: ImageSource, indices: Iterable[int]) -> tuple[list[Image.Image], list[int]]:
    """The readable images among `indices`; unreadable ones are skipped with a warning."""
    images, kept = [], []
    for index in indices:
        try:
            images.append(source.load(index))
        except UnreadableImage as err:
            warnings.warn(f"skipping unreadable image {err}", stacklevel=2)
            continue
        kept.append(index)
    return images, kept


def tower_rows(tower: Tower, plan: ExtractionPlan, images: list[Image.Image], indices: list[int]) -> Rows:
    """One batch of images -> its selected rows."""
    hidden = tower.layer_output(tower.preprocess(images), plan.layer)
    return plan.tokens.select(hidden, indices, plan.seed)


def _prefetched(
    source: ImageSource, starts: range, batch_size: int
) -> Iterator[tuple[int, list[Image.Image], list[int]]]:
    """(batch length, readable images, their indices); the next batch decodes on a thread meanwhile."""
    n_images = len(source.ids)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for start in starts:
            batch = range(start, min(start + batch_size, n_images))
            current, pending = pending, (len(batch), pool.submit(load_batch, source, batch))
            if current is not None:
                yield current[0], *current[1].result()
        if pending is not None:
            yield pending[0], *pending[1].result()


def finish(writer: ShardWriter) -> ShardManifest:
    """Close the last shard; a run that produced no row at all is an error, not an empty success."""
    if writer.rows == 0:
        raise ExtractError("no image could be read: nothing was extracted")
    return writer.finish()


def run_extraction(
    tower: Tower, source: ImageSource, out: str | Path, plan: ExtractionPlan, progress: bool = True
) -> ShardManifest:
    """Extract `plan` over `source` into shard directory `out`; returns the final manifest."""
    writer = open_writer(plan, tower, source, Path(out))
    if writer.complete:
        return writer.manifest
    n_images = len(source.ids)
    starts, resume_image, done = batch_starts(writer, n_images, plan.batch_size)
    bar = tqdm(total=n_images, initial=starts.start, unit="img", desc="extract", disable=not progress)
    with bar:
        for n_batch, images, indices in _prefetched(source, starts, plan.batch_size):
            if images:
                rows = drop_written(tower_rows(tower, plan, images, indices), resume_image, done)
                writer.add(*rows)
            bar.update(n_batch)
    return finish(writer)
