"""Per-image latent activations paired with image embeddings, read in batches of images.

Every metric streams over these batches (twice for the monosemanticity score), so a source must
be re-iterable and must never need all rows in memory: the file source slices safetensors lazily.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from sae_modules.activations.shards import ShardError, ShardManifest, read_manifest
from sae_modules.evaluation.errors import EvaluationError

ACTIVATIONS_KEY = "activations"
EMBEDDINGS_KEY = "embeddings"


class TensorBatches:
    """In-memory activations [N, F] and embeddings [N, D], served `batch_size` images at a time."""

    def __init__(self, activations: Tensor, embeddings: Tensor | None, batch_size: int = 1024) -> None:
        _check_matrix(activations, "activations")
        if embeddings is not None:
            _check_matrix(embeddings, "embeddings")
            if embeddings.shape[0] != activations.shape[0]:
                raise EvaluationError(
                    f"embeddings has {embeddings.shape[0]} rows but activations has {activations.shape[0]}: "
                    "both need one row per image, in the same order", "embeddings")
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be at least 1, got {batch_size}", "batch_size")
        self.activations, self.embeddings, self.batch_size = activations, embeddings, batch_size
        self.n_images, self.n_latents = activations.shape
        self.d_embed = None if embeddings is None else embeddings.shape[1]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for start in range(0, self.n_images, self.batch_size):
            stop = start + self.batch_size
            yield self.activations[start:stop], None if self.embeddings is None else self.embeddings[start:stop]


class SafetensorsBatches:
    """Rows of tensor `activations` from one or more files (concatenated in order) and, optionally,
    tensor `embeddings` from one file; only the rows of the current batch are read."""

    def __init__(self, activation_files: Sequence[str | os.PathLike], embeddings_file: str | os.PathLike | None,
                 batch_size: int = 1024) -> None:
        if not activation_files:
            raise EvaluationError("at least one activations file is needed", "activations")
        self.activation_files = [Path(f) for f in activation_files]
        self.embeddings_file = None if embeddings_file is None else Path(embeddings_file)
        self.batch_size = batch_size
        shapes = [_tensor_shape(f, ACTIVATIONS_KEY, "activations") for f in self.activation_files]
        widths = {s[1] for s in shapes}
        if len(widths) != 1:
            raise EvaluationError(f"activation files disagree on the number of latents: {sorted(widths)}", "activations")
        self.n_latents = widths.pop()
        self.n_images = sum(s[0] for s in shapes)
        self._rows = [s[0] for s in shapes]
        self.d_embed = None
        if self.embeddings_file is not None:
            rows, self.d_embed = _tensor_shape(self.embeddings_file, EMBEDDINGS_KEY, "embeddings")
            if rows != self.n_images:
                raise EvaluationError(
                    f"{self.embeddings_file} has {rows} embeddings but the activations cover {self.n_images} images",
                    "embeddings")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        offset = 0
        emb_handle = None if self.embeddings_file is None else safe_open(self.embeddings_file, "pt")
        for file, rows in zip(self.activation_files, self._rows):
            with safe_open(file, "pt") as handle:
                acts = handle.get_slice(ACTIVATIONS_KEY)
                for start in range(0, rows, self.batch_size):
                    stop = min(start + self.batch_size, rows)
                    emb = None
                    if emb_handle is not None:
                        emb = emb_handle.get_slice(EMBEDDINGS_KEY)[offset + start:offset + stop]
                    yield acts[start:stop], emb
            offset += rows


def _tensor_shape(file: Path, key: str, field: str) -> tuple[int, int]:
    try:
        with safe_open(file, "pt") as handle:
            if key not in set(handle.keys()):
                raise EvaluationError(f"{file} has no tensor {key!r} (found {sorted(handle.keys())})", field)
            shape = handle.get_slice(key).get_shape()
    except FileNotFoundError:
        raise EvaluationError(f"{file} does not exist", field) from None
    except (SafetensorError, OSError) as err:
        raise EvaluationError(f"{file} is not a readable safetensors file: {err}", field) from None
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise EvaluationError(f"tensor {key!r} in {file} must be a non-empty matrix [rows, columns], got {shape}",
                              field)
    return shape[0], shape[1]


def _check_matrix(tensor: Tensor, field: str) -> None:
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise EvaluationError(f"{field} must be a non-empty matrix [images, columns], got {tuple(tensor.shape)}", field)
    if not torch.is_floating_point(tensor):
        raise EvaluationError(f"{field} must be floating point, got {tensor.dtype}", field)


def shard_manifest_for(shards: str | os.PathLike, d_in: int, field: str) -> ShardManifest:
    """The shard directory's manifest, checked to hold `d_in`-wide vectors; EvaluationError names `field`."""
    try:
        manifest = read_manifest(shards)
    except ShardError as err:
        raise EvaluationError(str(err), field) from None
    if manifest.d_in != d_in:
        raise EvaluationError(f"the shards hold d_in={manifest.d_in} vectors but the SAE takes d_in={d_in}", field)
    return manifest
