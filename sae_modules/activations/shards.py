"""Activation shards on disk: the contract between extraction, training and evaluation.

A shard directory holds `manifest.json` and `shard-00000.safetensors`, ... Each shard carries
`activations` [n, d_in], `image_index` int64 [n] (into the manifest's `images`) and `token_index`
int64 [n] (CLS = 0, patches 1..P, -1 for a mean-pooled vector). Shards are written atomically and
the manifest is rewritten after each one, so a killed job leaves only whole, hashed shards behind
and a rerun picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from sae_modules.activations.blocks import Layer
from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.errors import VlmSteerError

FORMAT = "vlm-steer-activations/1"
MANIFEST = "manifest.json"
DType = Literal["float32", "float16", "bfloat16"]
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
SHARD_KEYS = ("activations", "image_index", "token_index")


class ShardError(VlmSteerError):
    """A shard directory, manifest or shard file is missing, malformed or corrupted."""


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    count: int = Field(ge=0)
    sha256: str


class ShardManifest(BaseModel):
    """What was extracted, from which images, and which shard files hold it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["vlm-steer-activations/1"] = FORMAT
    model: str
    layer: Layer = Field(description="Block index (negative counts from the end), or 'last': the image embedding.")
    tokens: str = Field(description="all | cls | patches | mean | random:K")
    d_in: int = Field(gt=0)
    dtype: DType = "float32"
    count: int = Field(0, ge=0, description="Total vectors over all shards.")
    images: list[str] = Field(description="Relative path or dataset row id of each image, in order.")
    labels: list[str | None] | None = None
    seed: int = 0
    shards: list[ShardEntry] = Field(default_factory=list)
    complete: bool = False


def _manifest_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.name == MANIFEST else path / MANIFEST


def read_manifest(path: str | os.PathLike) -> ShardManifest:
    """The manifest of a shard directory (`path` is the directory or its manifest.json)."""
    file = _manifest_path(path)
    try:
        return ShardManifest.model_validate_json(file.read_bytes())
    except FileNotFoundError:
        raise ShardError(f"no {MANIFEST} in {file.parent}: not an activation shard directory") from None
    except ValidationError as err:
        fields = ", ".join(".".join(map(str, e["loc"])) or "manifest" for e in err.errors())
        raise ShardError(f"{file} is not a valid activation manifest (fields: {fields})") from None


def load_shard(path: str | os.PathLike, entry: ShardEntry, verify: bool = True) -> dict[str, Tensor]:
    """One shard's tensors; with `verify`, its sha256 must match the manifest (catches corruption)."""
    file = _manifest_path(path).parent / entry.file
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"shard file {file} is missing") from None
    if verify and hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardError(f"shard {file} is corrupted: its sha256 does not match the manifest")
    try:
        tensors = load_safetensors(data)
    except SafetensorError as err:
        raise ShardError(f"shard {file} is not a readable safetensors file: {err}") from None
    missing = [k for k in SHARD_KEYS if k not in tensors]
    if missing:
        raise ShardError(f"shard {file} lacks tensors {missing}")
    counts = {k: tensors[k].shape[0] for k in SHARD_KEYS}
    if set(counts.values()) != {entry.count}:
        raise ShardError(f"shard {file} holds {counts} rows, the manifest says {entry.count}")
    return tensors


def iter_shards(path: str | os.PathLike, verify: bool = True) -> Iterator[dict[str, Tensor]]:
    """Every shard of a directory, in order."""
    manifest = read_manifest(path)
    for entry in manifest.shards:
        yield load_shard(path, entry, verify)


def _same_job(old: ShardManifest, new: ShardManifest) -> list[str]:
    keys = ("model", "layer", "tokens", "d_in", "dtype", "images", "labels", "seed")
    return [k for k in keys if getattr(old, k) != getattr(new, k)]


class ShardWriter:
    """Buffers vectors into shards of `shard_size` rows; resumes a directory left by a killed job.

    On open, an existing manifest for the same job is kept up to its last shard that still
    verifies; shards after a missing or corrupted one are dropped (with a warning) and redone.
    """

    def __init__(self, out_dir: str | os.PathLike, manifest: ShardManifest, shard_size: int) -> None:
        if shard_size < 1:
            raise ShardError(f"shard_size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.dtype = TORCH_DTYPES[manifest.dtype]
        self.manifest = manifest.model_copy(update={"shards": [], "count": 0, "complete": False})
        self._last_image, self._last_image_count = 0, 0
        self._buffer: dict[str, list[Tensor]] = {k: [] for k in SHARD_KEYS}
        self._buffered = 0
        if _manifest_path(self.out_dir).exists():
            self._resume(read_manifest(self.out_dir))
        self._write_manifest()

    def _resume(self, old: ShardManifest) -> None:
        changed = _same_job(old, self.manifest)
        if changed:
            raise ShardError(
                f"{self.out_dir} already holds a different extraction (differs in: {', '.join(changed)}); "
                "choose another --out or delete it"
            )
        kept: list[ShardEntry] = []
        for entry in old.shards:
            try:
                tensors = load_shard(self.out_dir, entry, verify=True)
            except ShardError as err:
                warnings.warn(f"{err}; it and later shards will be extracted again", stacklevel=3)
                break
            kept.append(entry)
            self._track(tensors["image_index"])
        self.manifest.shards = kept
        self.manifest.count = sum(e.count for e in kept)
        self.manifest.complete = old.complete and len(kept) == len(old.shards)

    @property
    def complete(self) -> bool:
        return self.manifest.complete

    @property
    def rows(self) -> int:
        """Rows on disk plus rows buffered for the next shard."""
        return self.manifest.count + self._buffered

    def resume_position(self) -> tuple[int, int]:
        """(first image to extract, how many of its vectors are already on disk).

        The vector stream is a deterministic function of the images, so a rerun restarts at the
        last image that has vectors on disk and drops the ones already written.
        """
        return self._last_image, self._last_image_count

    def _track(self, image_index: Tensor) -> None:
        last = int(image_index[-1])
        count = int((image_index == last).sum())
        if last == self._last_image:
            self._last_image_count += count
        else:
            self._last_image, self._last_image_count = last, count

    def add(self, activations: Tensor, image_index: Tensor, token_index: Tensor) -> None:
        """Append rows; full shards are written as soon as they fill."""
        if activations.ndim != 2 or activations.shape[1] != self.manifest.d_in:
            raise ShardError(f"activations must be [n, {self.manifest.d_in}], got {list(activations.shape)}")
        if not image_index.shape == token_index.shape == activations.shape[:1]:
            raise ShardError("activations, image_index and token_index must have the same number of rows")
        self._buffer["activations"].append(activations.detach().to("cpu", self.dtype))
        self._buffer["image_index"].append(image_index.to("cpu", torch.int64))
        self._buffer["token_index"].append(token_index.to("cpu", torch.int64))
        self._buffered += activations.shape[0]
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        joined = {k: torch.cat(v) for k, v in self._buffer.items()}
        shard = {k: t[:n].contiguous() for k, t in joined.items()}
        self._buffer = {k: [t[n:]] for k, t in joined.items()}
        self._buffered -= n
        name = f"shard-{len(self.manifest.shards):05d}.safetensors"
        data = save_safetensors(shard, metadata={"format": FORMAT})
        atomic_write_bytes(self.out_dir / name, data)
        self.manifest.shards.append(ShardEntry(file=name, count=n, sha256=hashlib.sha256(data).hexdigest()))
        self.manifest.count += n
        self._track(shard["image_index"])
        self._write_manifest()

    def finish(self) -> ShardManifest:
        """Write the last partial shard and mark the directory complete."""
        if self._buffered:
            self._flush(self._buffered)
        self.manifest.complete = True
        self._write_manifest()
        return self.manifest

    def _write_manifest(self) -> None:
        data = json.dumps(self.manifest.model_dump(mode="json"), indent=1).encode()
        atomic_write_bytes(_manifest_path(self.out_dir), data)
