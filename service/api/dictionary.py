"""The latent dictionary over HTTP: search latents by label, one latent's statistics, relative pin values.

The ingress reads each registered SAE's dictionary files (`vlm-steer evaluate stats`; a few hundred
kB for 65k latents) once at start, so these routes never touch a model replica. Files that are
missing, unreadable or computed for another version of the checkpoint are not served: the SAE's
routes answer 404 saying why, and relative values for it are refused, never guessed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_labels import LatentLabel, LatentLabels, Vocabulary, load_latent_labels
from sae_modules.evaluation.latent_stats import LatentStats, check_fresh, load_latent_stats, resolve_units
from sae_modules.intervention_spec import Intervention
from service.api.errors import APIError
from service.assets import resolve_checkpoints
from service.config import ServiceSettings

log = logging.getLogger(__name__)

DEFAULT_PIN = {"value": 5.0, "unit": "max"}
"""The relative pin the README documents and the playground starts from (5 x the latent's max activation)."""
Order = Literal["max", "score", "frequency"]


@dataclass
class SAEDictionary:
    stats: LatentStats
    labels: LatentLabels | None

    def __post_init__(self) -> None:
        self.by_latent = {} if self.labels is None else self.labels.by_latent()

    def label(self, latent: int) -> LatentLabel | None:
        return self.by_latent.get(latent)


@dataclass
class Dictionaries:
    """Per SAE id: its dictionary, or why there is none (shown in the 404)."""

    loaded: dict[str, SAEDictionary]
    missing: dict[str, str]

    def get(self, sae_id: str) -> SAEDictionary:
        if sae_id in self.loaded:
            return self.loaded[sae_id]
        if sae_id in self.missing:
            raise APIError(404, f"SAE {sae_id!r} has no latent dictionary: {self.missing[sae_id]}", "sae")
        raise APIError(404, f"unknown SAE {sae_id!r}; GET /v1/saes lists the loaded ones", "sae")

    def stats(self, sae_id: str) -> LatentStats | None:
        entry = self.loaded.get(sae_id)
        return None if entry is None else entry.stats


def load_dictionaries(sae_dirs: Mapping[str, str]) -> Dictionaries:
    """Read the dictionary beside each SAE checkpoint folder; labels are optional, statistics are not."""
    loaded, missing = {}, {}
    for sae_id, path in sae_dirs.items():
        directory = Path(path)
        if not directory.is_dir():
            missing[sae_id] = f"{path} is not a local folder"
            continue
        try:
            stats = load_latent_stats(directory)
            check_fresh(stats.info.sae_sha256, directory)
        except EvaluationError as err:
            missing[sae_id] = str(err)
            log.warning("SAE %s: no latent dictionary served: %s", sae_id, err)
            continue
        try:
            labels = load_latent_labels(directory)
            check_fresh(labels.sae_sha256, directory, "latent labels")
        except EvaluationError as err:
            labels = None
            log.warning("SAE %s: latent statistics without labels: %s", sae_id, err)
        loaded[sae_id] = SAEDictionary(stats, labels)
    return Dictionaries(loaded, missing)


def registry_dictionaries(settings: ServiceSettings) -> Dictionaries:
    """The dictionaries of the SAEs the service serves (the registry's, or the demo's)."""
    try:
        saes = resolve_checkpoints(settings).saes
    except ValueError as err:  # a registry the model replicas refuse too; the ingress still starts and says so
        log.warning("no latent dictionaries: %s", err)
        return Dictionaries({}, {})
    return load_dictionaries(saes)


def resolve_interventions(interventions: Sequence[Intervention], dictionaries: Dictionaries, sae_id: str,
                          where: str) -> list[Intervention]:
    """Relative values (`unit` max, mean, p99) as raw values for the SAE; InterventionError names the field."""
    return resolve_units(interventions, dictionaries.stats(sae_id), where)


class LabelOut(BaseModel):
    label: str
    score: float = Field(description="CLIP cosine of the label with the latent's top-image prototype.")
    margin: float = Field(description="score minus the runner-up word's.")
    n_images: int


class LatentRow(BaseModel):
    latent: int
    label: LabelOut | None
    frequency: float = Field(description="Fraction of the statistics' activation vectors on which it fires.")
    mean: float | None = Field(description="Mean activation when firing; null if it never fired.")
    max: float | None
    p99: float | None = Field(description="99th percentile of its firing values (within quantile_relative_error).")


class TopImage(BaseModel):
    image: str = Field(description="Image id in the statistics' activation set (path relative to images_root).")
    value: float = Field(description="The latent's largest activation on that image.")


class LatentDetail(LatentRow):
    sae: str
    fire_count: int
    n_vectors: int
    quantile_relative_error: float
    top_images: list[TopImage]
    images_root: str | None
    vocabulary: Vocabulary | None
    default_pin: dict | None = Field(description="The documented relative pin and the raw value it resolves to.")


class LatentSearch(BaseModel):
    sae: str
    query: str | None
    order: Order
    vocabulary: Vocabulary | None
    data: list[LatentRow]


def _row(entry: SAEDictionary, latent: int) -> LatentRow:
    stats = entry.stats
    fired = int(stats.fire_count[latent]) > 0
    label = entry.label(latent)
    return LatentRow(
        latent=latent, label=None if label is None else LabelOut(**label.model_dump(exclude={"latent"})),
        frequency=float(stats.frequency[latent]),
        mean=float(stats.mean[latent]) if fired else None, max=float(stats.max[latent]) if fired else None,
        p99=float(stats.p99[latent]) if fired else None,
    )


def search(entry: SAEDictionary, query: str | None, top_k: int, order: Order) -> list[int]:
    """Latents whose label contains `query` (case-insensitive; exact labels first), or all live latents,
    sorted by `order`: max activation (strongest first, the default), label score, or firing frequency."""
    stats = entry.stats
    live = stats.live.nonzero().squeeze(1).tolist()
    labels = entry.by_latent
    keys = {"max": lambda k: float(stats.max[k]), "frequency": lambda k: float(stats.fire_count[k]),
            "score": lambda k: labels[k].score if k in labels else -2.0}
    if query:
        needle = query.strip().lower()
        hits = [k for k in live if k in labels and needle in labels[k].label.lower()]
        hits.sort(key=lambda k: (labels[k].label.lower() == needle, keys[order](k)), reverse=True)
    else:
        hits = sorted(live, key=keys[order], reverse=True)
    return hits[:top_k]


def dictionary_router(dictionaries: Dictionaries, max_top_k: int) -> APIRouter:
    router = APIRouter(prefix="/v1/saes", tags=["dictionary"])

    @router.get("/{sae}/latents", response_model=LatentSearch)
    async def latents(
        sae: str,
        query: Annotated[str | None, Query(max_length=200, description="Text the label must contain.")] = None,
        top_k: Annotated[int, Query(ge=1, description="How many latents to return.")] = 10,
        order: Annotated[Order, Query(description="max (strongest first), score (label fit), frequency.")] = "max",
    ) -> LatentSearch:
        """Search the SAE's latents by label; without a query, its live latents."""
        entry = dictionaries.get(sae)
        if top_k > max_top_k:
            raise APIError(422, f"top_k {top_k} exceeds the limit {max_top_k}", "top_k")
        if query and entry.labels is None:
            raise APIError(404, f"SAE {sae!r} has latent statistics but no labels to search "
                                "(vlm-steer evaluate stats --clip ... --vocabulary ...)", "query")
        found = search(entry, query, top_k, order)
        return LatentSearch(sae=sae, query=query, order=order,
                            vocabulary=None if entry.labels is None else entry.labels.vocabulary,
                            data=[_row(entry, k) for k in found])

    @router.get("/{sae}/latents/{latent}", response_model=LatentDetail)
    async def latent(sae: str, latent: int) -> LatentDetail:
        """One latent's statistics, label and top images, and what the default relative pin means for it."""
        entry = dictionaries.get(sae)
        stats = entry.stats
        if not 0 <= latent < stats.n_latents:
            raise APIError(404, f"latent {latent} is out of range: the SAE has {stats.n_latents} latents", "latent")
        row = _row(entry, latent)
        pin = None
        if row.max is not None:
            raw = resolve_units([Intervention(latent=latent, **DEFAULT_PIN)], stats)[0].value
            pin = {**DEFAULT_PIN, "raw_value": raw}
        return LatentDetail(
            **row.model_dump(), sae=sae, fire_count=int(stats.fire_count[latent]), n_vectors=stats.info.n_vectors,
            quantile_relative_error=stats.info.quantile_relative_error,
            top_images=[TopImage(image=image, value=value) for image, value in stats.top(latent)],
            images_root=stats.info.images_root,
            vocabulary=None if entry.labels is None else entry.labels.vocabulary, default_pin=pin,
        )

    return router
