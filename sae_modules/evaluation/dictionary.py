"""Write an SAE's latent dictionary beside its checkpoint: statistics always, labels when images and a CLIP are given.

One entry point for `vlm-steer evaluate stats`, for training (statistics at the end of a run) and
for the shipped demo, so all three write the same files the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from sae_modules.evaluation.embedders import load_embedder
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_labels import LatentLabels, label_latents, save_latent_labels
from sae_modules.evaluation.latent_stats import (
    RELATIVE_ERROR,
    STATS_TENSORS,
    LatentStats,
    compute_latent_stats,
    save_latent_stats,
)
from sae_modules.formats.detect import load_sae


@dataclass
class Dictionary:
    stats: LatentStats
    labels: LatentLabels | None
    files: list[Path]


def write_dictionary(sae_dir: str | Path, activations: str | Path, *, images: str | Path | None = None,
                     clip: str | None = None, vocabulary: str | None = None, top_k: int = 16,
                     batch_size: int = 1024, max_vectors: int | None = None,
                     relative_error: float = RELATIVE_ERROR, device: str | torch.device = "cpu") -> Dictionary:
    """Statistics of the SAE in `sae_dir` over the shard directory `activations`, saved beside it; with
    `images` (the folder the shards were extracted from), `clip` (clip:PATH or open_clip:ARCH@WEIGHTS with
    a text tower) and `vocabulary`, each live latent's label too."""
    directory = Path(sae_dir)
    if not directory.is_dir():
        raise EvaluationError(f"{directory} is not a local SAE checkpoint folder (the dictionary is written "
                              "beside the checkpoint)", "sae")
    if (clip is None) != (vocabulary is None) or (clip is not None and images is None):
        raise EvaluationError("labels need --images, --clip and --vocabulary together", "clip" if clip is None
                              else "vocabulary" if vocabulary is None else "images")
    if images is not None and not Path(images).is_dir():
        raise EvaluationError(f"{images} is not a folder", "images")
    sae = load_sae(directory)
    stats = compute_latent_stats(sae, directory, activations, top_k=top_k, images_root=images, batch_size=batch_size,
                                 max_vectors=max_vectors, relative_error=relative_error, device=device)
    labels = None
    if clip is not None:
        embedder = load_embedder(clip, device)
        if not hasattr(embedder, "embed_text"):
            raise EvaluationError(f"{clip} has no text tower", "clip")
        root = Path(images)

        def embed(ids: list[str]) -> torch.Tensor:
            rows = []
            for start in range(0, len(ids), 64):
                batch = []
                for image_id in ids[start:start + 64]:
                    try:
                        with Image.open(root / image_id) as image:
                            batch.append(image.convert("RGB"))
                    except OSError as err:
                        raise EvaluationError(f"cannot read top image {root / image_id}: {err}", "images") from None
                rows.append(embedder.embed(batch, 0))
            return torch.cat(rows)

        labels = label_latents(stats, embed, embedder, vocabulary, embedder.name)
    files = [save_latent_stats(stats, directory), directory / STATS_TENSORS]
    if labels is not None:
        files.append(save_latent_labels(labels, directory))
    return Dictionary(stats, labels, files)
