"""Images -> per-image latent activations and image embeddings on disk: the input of every metric.

The SAE runs on every token of its layer's output, then each image's tokens are pooled to one
value per latent. The paper's code pools by the mean over all tokens (`--mean_pool`, used for its
token-level steering SAE) and by taking the CLS token for SAEs trained on CLS (`--cls_only`, its
MS tables); max pooling is offered besides. The "No SAE" baseline pools the layer's raw neurons.

Activations go to shards of `shard_images` images (written atomically, so memory stays bounded at
50,000 images x 65,536 latents); embeddings to one file; image ids and labels to images.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from safetensors.torch import save
from torch import Tensor
from tqdm.auto import tqdm

from sae_modules.activations.blocks import Layer
from sae_modules.activations.images import ImageSource
from sae_modules.activations.towers import Tower
from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.evaluation.embedders import ImageEmbedder
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.sources import ACTIVATIONS_KEY, EMBEDDINGS_KEY, SafetensorsBatches
from sae_modules.saes.base import SAE

Pooling = Literal["mean", "max", "cls"]
POOLINGS: tuple[str, ...] = ("mean", "max", "cls")
IMAGES_FILE = "images.json"
EMBEDDINGS_FILE = "embeddings.safetensors"


def pool_tokens(latents: Tensor, pooling: Pooling) -> Tensor:
    """[B, T, F] -> [B, F]: one value per image and latent."""
    if pooling == "mean":
        return latents.mean(dim=1)
    if pooling == "max":
        return latents.amax(dim=1)
    if pooling == "cls":
        return latents[:, 0]
    raise EvaluationError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}", "pooling")


class EncodedImages(BaseModel):
    """images.json: what the activation shards and embeddings of an encoded directory describe."""

    ids: list[str]
    labels: list[str | None] | None = None
    root: str | None = None
    model: str
    layer: Layer
    sae: str | None
    pooling: str
    embedder: str
    n_latents: int
    activation_files: list[str]


@dataclass
class EncodedDir:
    """A directory written by `encode_images`, ready to stream."""

    path: Path
    info: EncodedImages

    @classmethod
    def open(cls, path: str | Path) -> EncodedDir:
        path = Path(path)
        try:
            info = EncodedImages.model_validate_json((path / IMAGES_FILE).read_text())
        except FileNotFoundError:
            raise EvaluationError(f"{path} has no {IMAGES_FILE}: not an encoded-images directory", "encoded") from None
        return cls(path, info)

    def batches(self, batch_size: int = 1024) -> SafetensorsBatches:
        return SafetensorsBatches([self.path / f for f in self.info.activation_files], self.path / EMBEDDINGS_FILE,
                                  batch_size)


def _image_batches(source: ImageSource, batch_size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(source.ids), batch_size):
        yield start, [source.load(i) for i in range(start, min(start + batch_size, len(source.ids)))]


@torch.no_grad()
def encode_images(tower: Tower, layer: Layer, sae: SAE | None, source: ImageSource, embedder: ImageEmbedder,
                  out: str | Path, *, pooling: Pooling = "mean", batch_size: int = 16, shard_images: int = 1024,
                  sae_name: str | None = None, progress: bool = True) -> EncodedDir:
    """Run tower -> SAE -> pooling and the embedder over every image; write the encoded directory."""
    if pooling not in POOLINGS:
        raise EvaluationError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}", "pooling")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if sae is not None:
        sae = sae.to(tower.device).eval()
    files: list[str] = []
    pending: list[Tensor] = []
    embeddings: list[Tensor] = []
    n_latents = None

    def flush() -> None:
        name = f"activations-{len(files):05d}.safetensors"
        atomic_write_bytes(out / name, save({ACTIVATIONS_KEY: torch.cat(pending).contiguous()}))
        files.append(name)
        pending.clear()

    n_pending = 0
    batches = _image_batches(source, batch_size)
    for start, images in tqdm(batches, total=-(-len(source.ids) // batch_size), desc="encode images",
                              disable=not progress):
        hidden = tower.layer_output(tower.preprocess(images), layer).float()
        if sae is not None:
            if hidden.shape[-1] != sae.d_in:
                raise EvaluationError(f"the SAE takes d_in={sae.d_in} but layer {layer} of {tower.name} has width "
                                      f"{hidden.shape[-1]}", "sae")
            hidden = sae.encode(hidden.to(next(sae.parameters()).dtype)).float()
        pooled = pool_tokens(hidden, pooling).cpu()
        n_latents = pooled.shape[1]
        pending.append(pooled)
        n_pending += len(pooled)
        embeddings.append(embedder.embed(images, start).float())
        if n_pending >= shard_images:
            flush()
            n_pending = 0
    if pending:
        flush()
    if n_latents is None:
        raise EvaluationError("no images to encode", "images")
    atomic_write_bytes(out / EMBEDDINGS_FILE, save({EMBEDDINGS_KEY: torch.cat(embeddings).contiguous()}))
    root = getattr(source, "root", None)
    info = EncodedImages(ids=list(source.ids), labels=source.labels, root=str(Path(root).resolve()) if root else None,
                         model=tower.name, layer=layer, sae=sae_name, pooling=pooling, embedder=embedder.name,
                         n_latents=n_latents, activation_files=files)
    atomic_write_bytes(out / IMAGES_FILE, info.model_dump_json(indent=1).encode())
    return EncodedDir(out, info)
