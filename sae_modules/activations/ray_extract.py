"""`extract --ray`: the same job on a Ray Data actor pool, one tower per actor (one GPU each).

Actors decode images and run the tower; the driver receives rows in order and is the only
writer, so the shard format, hashing and resume are exactly those of the local path. Resumed
rows equal an uninterrupted run's up to float rounding (Ray may batch images differently).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sae_modules.activations.extract import (
    ExtractionPlan,
    batch_starts,
    drop_written,
    finish,
    load_batch,
    open_writer,
    tower_rows,
)
from sae_modules.activations.images import ImageSource
from sae_modules.activations.shards import ShardManifest
from sae_modules.activations.towers import load_tower


class TowerActor:
    """Holds one tower; turns a batch of image indices into selected rows."""

    def __init__(
        self, model: str, weights: str | None, device: str, source: ImageSource, plan: ExtractionPlan
    ):
        self.tower = load_tower(model, weights, device)
        self.source = source
        self.plan = plan

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, indices = load_batch(self.source, batch["image"].tolist())
        if not images:
            empty = np.zeros(0, dtype=np.int64)
            nothing = np.zeros((0, self.tower.width_at(self.plan.layer)), np.float32)
            return {"activations": nothing, "image_index": empty, "token_index": empty}
        rows, image_index, token_index = tower_rows(self.tower, self.plan, images, indices)
        return {
            "activations": rows.float().cpu().numpy(),
            "image_index": image_index.numpy(),
            "token_index": token_index.numpy(),
        }


def run_ray_extraction(
    model: str,
    weights: str | None,
    device: str,
    source: ImageSource,
    out: str | Path,
    plan: ExtractionPlan,
    workers: int = 1,
    progress: bool = True,
) -> ShardManifest:
    """Extract with `workers` actors on the current Ray cluster (a local one is started if none)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    writer = open_writer(plan, load_tower(model, weights, "cpu"), source, Path(out))
    if writer.complete:
        return writer.manifest
    n_images = len(source.ids)
    starts, resume_image, done = batch_starts(writer, n_images, plan.batch_size)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    indices = ray.data.from_numpy(np.arange(starts.start, n_images, dtype=np.int64)).rename_columns(
        {"data": "image"}
    )
    rows = indices.map_batches(
        TowerActor,
        fn_constructor_args=(model, weights, device, source, plan),
        batch_size=plan.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
        num_gpus=gpus,
    )
    options = ray.data.DataContext.get_current().execution_options
    kept_order, options.preserve_order = options.preserve_order, True  # the writer needs image order
    try:
        with tqdm(
            total=n_images, initial=starts.start, unit="img", desc="extract", disable=not progress
        ) as bar:
            for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
                if len(batch["image_index"]) == 0:
                    continue
                tensors = tuple(
                    torch.from_numpy(np.array(batch[k]))
                    for k in ("activations", "image_index", "token_index")
                )
                writer.add(*drop_written(tensors, resume_image, done))
                bar.update(int(batch["image_index"][-1]) + 1 - bar.n)
    finally:
        options.preserve_order = kept_order
    return finish(writer)
