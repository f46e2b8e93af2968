"""Per-latent statistics of an SAE over an activation set, stored beside its checkpoint.

What a user needs to pick a latent and a value to pin it to: how often it fires, how strongly
when it does (mean, max and a high quantile of its firing values) and which images make it fire
most. One streaming pass over activation shards; memory does not grow with the number of vectors:

- counts, sums and maxima are exact (float64 sums);
- the 99th percentile of each latent's firing values comes from a log-bucketed histogram (the
  DDSketch idea): bucket i holds values in (g^(i-1), g^i] with g = (1+a)/(1-a), and the estimate
  2 g^i / (g + 1) is within relative error a of the exact order statistic of rank ceil(0.99 n)
  (numpy's `inverted_cdf` quantile) for values inside [1e-4, 1e5]; memory is 4 bytes per latent and
  bucket (1,036 buckets at a = 0.01);
- top images: each image's value is its largest activation over its vectors in the set, and the
  `top_k` highest images per latent are kept (vectors arrive in image order, as extraction writes them).

Files (format `vlm-steer-latent-stats`, version 1): `latent_stats.safetensors` (the tensors) and
`latent_stats.json` (how they were made, the sha256 of the SAE checkpoint they describe, the sha256
of the tensor file, and the ids of the referenced images). A checkpoint that changed since is
detected by `check_fresh`, so stale statistics are never served.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from sae_modules.activations.shards import ShardError, iter_shards
from sae_modules.atomic_file import atomic_write_bytes, sha256_file
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_summary import LatentSummaryAccumulator
from sae_modules.evaluation.sources import shard_manifest_for
from sae_modules.formats.writing import CHECKPOINT_FILES
from sae_modules.intervention_spec import Intervention, InterventionError
from sae_modules.saes.base import SAE

FORMAT = "vlm-steer-latent-stats"
FORMAT_VERSION = 1
STATS_JSON = "latent_stats.json"
STATS_TENSORS = "latent_stats.safetensors"
QUANTILE = 0.99
RELATIVE_ERROR = 0.01
SKETCH_RANGE = (1e-4, 1e5)
TENSOR_KEYS = ("fire_count", "mean", "max", "p99", "top_values", "top_images")


class StatsInfo(BaseModel):
    """The JSON half: what the statistics describe and how they were computed."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    sae_sha256: str = Field(description="sae_digest() of the checkpoint the statistics were computed for.")
    tensors_sha256: str = Field(description="sha256 of latent_stats.safetensors.")
    n_latents: int
    n_vectors: int = Field(description="Activation vectors the statistics are over.")
    n_images: int = Field(description="Images those vectors came from.")
    quantile: float = QUANTILE
    quantile_relative_error: float = RELATIVE_ERROR
    top_k: int
    image_value: str = "max over the image's vectors"
    activations: dict = Field(description="The activation set: path, model, layer, tokens, count.")
    images_root: str | None = Field(None, description="Folder the image ids are relative to, if one was given.")
    images: list[str] = Field(description="Ids of the images `top_images` indexes (relative paths or row ids).")


@dataclass
class LatentStats:
    """Per-latent figures; a latent with fire_count 0 never fired (its mean, max and p99 are 0)."""

    fire_count: Tensor
    """[F] int64: vectors on which the latent is positive."""
    mean: Tensor
    """[F] float64: mean activation over the vectors where it fires."""
    max: Tensor
    """[F] float32: largest activation."""
    p99: Tensor
    """[F] float32: 99th percentile of the firing values (relative error <= quantile_relative_error)."""
    top_values: Tensor
    """[F, k] float32: the latent's value on its top images, descending; 0 where fewer images fired."""
    top_images: Tensor
    """[F, k] int64: index into info.images of each top image, -1 where none."""
    info: StatsInfo

    @property
    def n_latents(self) -> int:
        return self.fire_count.numel()

    @property
    def frequency(self) -> Tensor:
        """[F] float64: fraction of vectors on which each latent fires."""
        return self.fire_count.double() / max(self.info.n_vectors, 1)

    @property
    def live(self) -> Tensor:
        return self.fire_count > 0

    def scale(self, latent: int, unit: str) -> float:
        """The raw value one `unit` stands for on `latent` (unit: max, mean or p99)."""
        table = {"max": self.max, "mean": self.mean, "p99": self.p99}
        return float(table[unit][latent])

    def top(self, latent: int) -> list[tuple[str, float]]:
        """(image id, value) of the latent's top images, best first."""
        return [(self.info.images[int(i)], float(v))
                for i, v in zip(self.top_images[latent], self.top_values[latent]) if int(i) >= 0]



def read_versioned_json(file: Path, fmt: str, version: int, field: str, how_to_make: str) -> dict[str, Any]:
    """A dictionary file's JSON header, checked to be `fmt` at a version this code reads.

    EvaluationError (naming `field`) says whether it is missing (and `how_to_make` it), unreadable,
    of another format, or newer than this vlm-steer."""
    try:
        header = json.loads(file.read_text())
    except FileNotFoundError:
        raise EvaluationError(f"no {file.name} in {file.parent}: {how_to_make}", field) from None
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot read {file}: {err}", field) from None
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise EvaluationError(f"{file} is not a {fmt} file", field)
    if not isinstance(header.get("format_version"), int) or header["format_version"] > version:
        raise EvaluationError(f"{file} has format_version {header.get('format_version')}; this vlm-steer reads "
                              f"up to {version}", field)
    return header

def sae_digest(sae_dir: str | Path) -> str:
    """sha256 over the checkpoint's own files (names and contents), so any change to weights or config shows."""
    directory = Path(sae_dir)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name in CHECKPOINT_FILES)
    if not files:
        raise EvaluationError(f"{directory} holds no SAE checkpoint files", "sae")
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


class FiringQuantile:
    """Streaming per-latent quantile of positive values in log-spaced buckets (see the module docstring)."""

    def __init__(self, n_latents: int, relative_error: float = RELATIVE_ERROR,
                 value_range: tuple[float, float] = SKETCH_RANGE) -> None:
        if not 0 < relative_error < 1:
            raise EvaluationError(f"relative_error must be in (0, 1), got {relative_error}", "relative_error")
        self.gamma = (1 + relative_error) / (1 - relative_error)
        self.log_gamma = math.log(self.gamma)
        self.first = math.ceil(math.log(value_range[0]) / self.log_gamma)
        self.n_buckets = math.ceil(math.log(value_range[1]) / self.log_gamma) - self.first + 1
        self.counts = torch.zeros(n_latents * self.n_buckets, dtype=torch.int32)

    def add(self, latents: Tensor, values: Tensor) -> None:
        """Count `values` (positive) of the given `latents` (same length, int64)."""
        buckets = torch.ceil(values.double().log() / self.log_gamma).long() - self.first
        flat = latents.cpu() * self.n_buckets + buckets.clamp(0, self.n_buckets - 1).cpu()
        self.counts.index_put_((flat,), torch.ones(len(flat), dtype=torch.int32), accumulate=True)

    def quantile(self, q: float, chunk: int = 4096) -> Tensor:
        """[F] estimate of each latent's q-quantile (rank ceil(q n)); 0 for a latent with no values."""
        table = self.counts.view(-1, self.n_buckets)
        out = torch.zeros(len(table), dtype=torch.float64)
        for start in range(0, len(table), chunk):
            cumulative = table[start:start + chunk].long().cumsum(dim=1)
            total = cumulative[:, -1]
            rank = torch.ceil(q * total.double()).long().clamp(min=1)
            bucket = torch.searchsorted(cumulative, rank.unsqueeze(1)).squeeze(1) + self.first
            value = 2 * self.gamma ** bucket.double() / (self.gamma + 1)
            out[start:start + chunk] = torch.where(total > 0, value, torch.zeros_like(value))
        return out


class LatentStatsAccumulator:
    """Feed (latents [n, F], image_index [n]) batches in image order; `result()` gives the statistics."""

    def __init__(self, n_latents: int, top_k: int = 16, relative_error: float = RELATIVE_ERROR) -> None:
        self.n_latents, self.top_k, self.relative_error = n_latents, top_k, relative_error
        self.fire_count = torch.zeros(n_latents, dtype=torch.int64)
        self.sum = torch.zeros(n_latents, dtype=torch.float64)
        self.max = torch.zeros(n_latents, dtype=torch.float32)
        self.sketch = FiringQuantile(n_latents, relative_error)
        self.per_image = LatentSummaryAccumulator(n_latents, top_k)
        self.image_ids: list[int] = []
        self.n_vectors = 0
        self._held: tuple[Tensor, Tensor] | None = None

    def update(self, latents: Tensor, image_index: Tensor) -> None:
        if latents.ndim != 2 or latents.shape[1] != self.n_latents or image_index.shape != latents.shape[:1]:
            raise EvaluationError(f"latents {tuple(latents.shape)} and image_index {tuple(image_index.shape)} do not "
                                  f"fit [n, {self.n_latents}] and [n]", "activations")
        latents, image_index = latents.float().cpu(), image_index.long().cpu()
        if not torch.isfinite(latents).all():
            raise EvaluationError(f"latents of vectors {self.n_vectors}.. contain NaN or infinity", "activations")
        fired = latents > 0
        self.fire_count += fired.sum(dim=0)
        self.sum += latents.clamp(min=0).sum(dim=0, dtype=torch.float64)
        self.max = torch.maximum(self.max, latents.amax(dim=0).clamp(min=0))
        rows, cols = fired.nonzero(as_tuple=True)
        self.sketch.add(cols, latents[rows, cols])
        self.n_vectors += len(latents)
        self._add_images(latents, image_index)

    def _add_images(self, latents: Tensor, image_index: Tensor, final: bool = False) -> None:
        """Per-image maxima of complete images; the last image's rows wait for the next batch."""
        if self._held is not None:
            latents, image_index = torch.cat([self._held[0], latents]), torch.cat([self._held[1], image_index])
            self._held = None
        if not len(image_index):
            return
        if (image_index.diff() < 0).any() or (self.image_ids and int(image_index[0]) <= self.image_ids[-1]):
            raise EvaluationError("activation vectors are not in image order (image_index decreases); "
                                  "statistics need the order extraction writes", "activations")
        keep = len(image_index) if final else int(torch.searchsorted(image_index, image_index[-1]))
        if keep < len(image_index):
            self._held = (latents[keep:], image_index[keep:])
        if keep == 0:
            return
        ids, inverse = torch.unique_consecutive(image_index[:keep], return_inverse=True)
        per_image = torch.zeros(len(ids), self.n_latents).scatter_reduce_(
            0, inverse.unsqueeze(1).expand(-1, self.n_latents), latents[:keep], "amax", include_self=False)
        self.per_image.update(per_image)
        self.image_ids.extend(ids.tolist())

    def result(self, image_names: Sequence[str], **info: Any) -> LatentStats:
        """The statistics; `image_names[i]` is image i's id, `info` the StatsInfo fields a pass cannot know."""
        if self._held is not None:
            self._add_images(*self._held, final=True)
        if self.n_vectors == 0:
            raise EvaluationError("no activation vectors", "activations")
        summary = self.per_image.result()
        ids = torch.tensor(self.image_ids)
        valid = summary.top_values > 0
        positions = torch.where(valid, ids[summary.top_images], -1)
        pad = self.top_k - positions.shape[1]
        top_values = torch.nn.functional.pad(torch.where(valid, summary.top_values, 0.0), (0, pad))
        positions = torch.nn.functional.pad(positions, (0, pad), value=-1)
        referenced = positions[positions >= 0].unique()
        top_images = torch.where(positions >= 0, torch.searchsorted(referenced, positions), -1)
        mean = self.sum / self.fire_count.clamp(min=1)
        p99 = torch.minimum(self.sketch.quantile(QUANTILE).float(), self.max)
        return LatentStats(
            fire_count=self.fire_count, mean=mean, max=self.max + 0.0, p99=p99 + 0.0, top_values=top_values.float(),
            top_images=top_images,
            info=StatsInfo(**info, tensors_sha256="", n_latents=self.n_latents, n_vectors=self.n_vectors,
                           n_images=len(self.image_ids), quantile_relative_error=self.relative_error,
                           top_k=self.top_k, images=[image_names[i] for i in referenced.tolist()]),
        )


@torch.no_grad()
def compute_latent_stats(sae: SAE, sae_dir: str | Path, shards: str | Path, *, top_k: int = 16,
                         images_root: str | Path | None = None, batch_size: int = 1024,
                         max_vectors: int | None = None, relative_error: float = RELATIVE_ERROR,
                         device: str | torch.device = "cpu") -> LatentStats:
    """One pass of the SAE's inference encode over the shard directory (up to max_vectors vectors)."""
    manifest = shard_manifest_for(shards, sae.d_in, "activations")
    if top_k < 1:
        raise EvaluationError(f"top_k must be at least 1, got {top_k}", "top_k")
    sae = sae.to(device).eval()
    dtype = next(sae.parameters()).dtype
    acc = LatentStatsAccumulator(sae.n_latents, top_k, relative_error)
    try:
        for shard in iter_shards(shards):
            for x, index in zip(shard["activations"].split(batch_size), shard["image_index"].split(batch_size)):
                if max_vectors is not None:
                    x, index = x[:max_vectors - acc.n_vectors], index[:max_vectors - acc.n_vectors]
                if len(x):
                    acc.update(sae.encode(x.to(device, dtype)), index)
            if max_vectors is not None and acc.n_vectors >= max_vectors:
                break
    except ShardError as err:
        raise EvaluationError(str(err), "activations") from None
    activations = {"path": str(shards), "model": manifest.model, "layer": manifest.layer, "tokens": manifest.tokens,
                   "count": manifest.count}
    return acc.result(manifest.images, sae_sha256=sae_digest(sae_dir), activations=activations,
                      images_root=None if images_root is None else str(images_root))


def save_latent_stats(stats: LatentStats, sae_dir: str | Path) -> Path:
    """Write both files beside the checkpoint, each atomically, tensors first (the JSON names their hash)."""
    directory = Path(sae_dir)
    tensors = {"fire_count": stats.fire_count, "mean": stats.mean, "max": stats.max, "p99": stats.p99,
               "top_values": stats.top_values, "top_images": stats.top_images}
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT})
    stats.info.tensors_sha256 = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(directory / STATS_TENSORS, data)
    atomic_write_bytes(directory / STATS_JSON, (stats.info.model_dump_json(indent=1) + "\n").encode())
    return directory / STATS_JSON


def load_latent_stats(sae_dir: str | Path) -> LatentStats:
    """Read the statistics beside a checkpoint; EvaluationError names what is missing, newer or corrupt."""
    directory = Path(sae_dir)
    header = read_versioned_json(directory / STATS_JSON, FORMAT, FORMAT_VERSION, "stats",
                                 "run `vlm-steer evaluate stats`")
    try:
        info = StatsInfo.model_validate(header)
        data = (directory / STATS_TENSORS).read_bytes()
    except ValidationError as err:
        raise EvaluationError(f"{directory / STATS_JSON} is malformed: {err.errors()[0]['loc']}", "stats") from None
    except OSError as err:
        raise EvaluationError(f"cannot read {directory / STATS_TENSORS}: {err}", "stats") from None
    if hashlib.sha256(data).hexdigest() != info.tensors_sha256:
        raise EvaluationError(f"{directory / STATS_TENSORS} does not match the sha256 in {STATS_JSON}", "stats")
    try:
        tensors = load_safetensors(data)
    except SafetensorError as err:
        raise EvaluationError(f"{directory / STATS_TENSORS} is not readable: {err}", "stats") from None
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    if missing:
        raise EvaluationError(f"{directory / STATS_TENSORS} lacks tensors {missing}", "stats")
    return LatentStats(**{k: tensors[k] for k in TENSOR_KEYS}, info=info)


def check_fresh(recorded_sha256: str, sae_dir: str | Path, what: str = "latent statistics") -> None:
    """Raise EvaluationError unless `recorded_sha256` is the digest of the checkpoint now in `sae_dir`."""
    if recorded_sha256 != sae_digest(sae_dir):
        raise EvaluationError(f"the {what} in {sae_dir} were computed for another version of the SAE "
                              "(sha256 differs): run `vlm-steer evaluate stats` again", "stats")


def resolve_units(interventions: Sequence[Intervention], stats: LatentStats | None,
                  where: str = "") -> list[Intervention]:
    """The interventions with every relative value turned into a raw one: `value` x the latent's `unit` figure.

    `{"value": 3, "unit": "max"}` on a latent whose max activation is 23.4 becomes `{"value": 70.2, "unit":
    "raw"}`. Raises InterventionError naming `{where}{i}.unit` (or `.latent`) when it cannot: no statistics
    for the SAE, `mul` (its value is a factor already), a latent beyond the statistics, or one that never fired.
    """
    resolved = []
    for i, intervention in enumerate(interventions):
        if intervention.unit == "raw":
            resolved.append(intervention)
            continue
        field = f"{where}{i}."
        if stats is None:
            raise InterventionError(f"unit {intervention.unit!r} needs the SAE's latent statistics, and this SAE has "
                                    "none (run `vlm-steer evaluate stats`); use unit 'raw'", f"{field}unit")
        if intervention.mode == "mul":
            raise InterventionError("unit applies to pin and nudge; a mul value is a factor already", f"{field}unit")
        if intervention.latent >= stats.n_latents:
            raise InterventionError(f"latent {intervention.latent} is out of range: the SAE has {stats.n_latents} "
                                    "latents", f"{field}latent")
        if int(stats.fire_count[intervention.latent]) == 0:
            raise InterventionError(f"latent {intervention.latent} never fired on the statistics' "
                                    f"{stats.info.n_vectors} vectors, so it has no {intervention.unit!r}; use unit "
                                    "'raw'", f"{field}unit")
        value = intervention.value * stats.scale(intervention.latent, intervention.unit)
        resolved.append(intervention.model_copy(update={"value": value, "unit": "raw"}))
    return resolved
