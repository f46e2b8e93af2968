"""What one batch of requests does on a model replica, as plain functions of a `SteeringEngine`.

Ray Serve's `@serve.batch` only gathers requests; the work is here so it runs (and is tested)
without Ray, and so both layouts share it: `colocated` calls `steer_generate_batch` in one
replica, `split` calls `steer_batch` in the steerer and `generate_batch` in the generator.
Each result carries its batch size and its index in the batch, so the ingress can observe one
batch-size sample per batch although the batch ran in another process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image

from sae_modules.intervention import reconstruction_stats, token_mask
from service.api.schemas import SAEInfo
from service.engine.types import (
    Conversation,
    GenerationOutput,
    GenerationRequest,
    OutputType,
    SamplingParams,
    SteeredEmbeds,
    SteerSpec,
    SteerStats,
)

if TYPE_CHECKING:
    from service.engine.engine import SteeringEngine


@dataclass
class ServingInfo:
    """What a model replica has loaded, as the ingress needs it to check requests before sending them."""

    model_id: str
    created: int
    n_tokens: int
    default_sae: str
    saes: list[SAEInfo]

    @property
    def sae_ids(self) -> list[str]:
        return [sae.id for sae in self.saes]

    def sae(self, sae_id: str) -> SAEInfo:
        return next(sae for sae in self.saes if sae.id == sae_id)


def serving_info(engine: SteeringEngine, model_id: str) -> ServingInfo:
    """`layer` is the resolved block index, so -2 on a 24-block tower reads 22."""
    saes = []
    for sae_id in engine.sae_ids:
        cfg = engine.sae(sae_id).cfg
        saes.append(SAEInfo(id=sae_id, layer=engine.steerer.block_index[sae_id], n_latents=cfg.n_latents,
                            architecture=cfg.architecture, d_in=cfg.d_in, default=sae_id == engine.default_sae_id))
    return ServingInfo(model_id, int(time.time()), engine.n_tokens, engine.default_sae_id, saes)


@dataclass
class SteerJob:
    image: Image.Image
    conversation: Conversation
    spec: SteerSpec
    params: SamplingParams


@dataclass
class BatchSlot:
    """Where a result sat in the batch that produced it."""

    size: int
    index: int


@dataclass
class EmbedResult:
    embeds: SteeredEmbeds
    slot: BatchSlot


@dataclass
class SteerResult:
    outputs: dict[OutputType, GenerationOutput]
    stats: SteerStats
    timings_s: dict[str, float]
    slot: BatchSlot


@dataclass
class EncodeJob:
    image: Image.Image
    sae_id: str
    tokens: Literal["all", "cls", "patches"]
    reduce: Literal["mean", "max"]
    top_k: int


@dataclass
class EncodeResult:
    latents: list[tuple[int, float]]
    l0: float
    fvu: float | None
    timings_s: dict[str, float] = field(default_factory=dict)
    slot: BatchSlot | None = None


def stage_timings(engine_timings: dict[str, float]) -> dict[str, float]:
    """The engine's timings under the service's stage names.

    LLaVA's `get_image_features` runs the tower and the projector in one call, so `tower` holds
    both (minus the SAE edit, which the steerer times inside the tower pass as `sae`).
    """
    stages = dict(engine_timings)
    vision, edit = stages.pop("vision_s", None), stages.pop("edit_s", None)
    if edit is not None:
        stages["sae"] = edit
    if vision is not None:
        stages["tower"] = vision - (edit or 0.0)
    return {name.removesuffix("_s"): seconds for name, seconds in stages.items()}


def steer_batch(engine: SteeringEngine, jobs: list[SteerJob]) -> list[EmbedResult]:
    """Steered (and/or default) image embeddings for a batch, moved to CPU so they can leave the replica."""
    start = time.perf_counter()
    pixel_values = engine.preprocess([job.image for job in jobs])
    preprocess_s = time.perf_counter() - start
    embeds = engine.steer_embeds(pixel_values, [job.spec for job in jobs])
    results = []
    for index, item in enumerate(embeds):
        item.timings_s = {"preprocess": preprocess_s, **stage_timings(item.timings_s)}
        results.append(EmbedResult(item, BatchSlot(len(jobs), index)))
    return results


def generation_requests(job: SteerJob, embeds: SteeredEmbeds) -> dict[OutputType, GenerationRequest]:
    """One generation request per output type the job asked for."""
    wanted: dict[OutputType, torch.Tensor | None] = {}
    if job.spec.want_steered:
        wanted["STEERED"] = embeds.steered
    if job.spec.want_default:
        wanted["DEFAULT"] = embeds.default
    missing = [kind for kind, tensor in wanted.items() if tensor is None]
    if missing:
        raise RuntimeError(f"the steerer returned no embeddings for {missing}")
    return {kind: GenerationRequest(job.conversation, tensor, job.params) for kind, tensor in wanted.items()}


def generate_batch(engine: SteeringEngine, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    return engine.generate(requests)


def steer_generate_batch(engine: SteeringEngine, jobs: list[SteerJob]) -> list[SteerResult]:
    """Steer and generate a batch in one replica: embeddings never leave the engine's device."""
    embedded = steer_batch(engine, jobs)
    keyed = [(i, kind, request) for i, (job, result) in enumerate(zip(jobs, embedded))
             for kind, request in generation_requests(job, result.embeds).items()]
    outputs = engine.generate([request for _, _, request in keyed])
    per_job: dict[int, dict[OutputType, GenerationOutput]] = defaultdict(dict)
    for (i, kind, _), output in zip(keyed, outputs):
        per_job[i][kind] = output
    results = []
    for i, result in enumerate(embedded):
        timings = dict(result.embeds.timings_s)
        timings["generate"] = max(output.seconds for output in per_job[i].values())
        results.append(SteerResult(per_job[i], result.embeds.stats, timings, result.slot))
    return results


def top_latents(latents: torch.Tensor, reduce: Literal["mean", "max"], top_k: int) -> list[tuple[int, float]]:
    """The `top_k` strongest latents of one image's [T, F] codes, each reduced over tokens."""
    pooled = latents.float().mean(dim=0) if reduce == "mean" else latents.float().amax(dim=0)
    values, indices = pooled.topk(min(top_k, pooled.numel()))
    return [(int(i), float(v)) for i, v in zip(indices, values) if v > 0]


@torch.no_grad()
def encode_batch(engine: SteeringEngine, jobs: list[EncodeJob]) -> list[EncodeResult]:
    """Top latents, L0 and FVU per image; one tower pass (stopping at the SAE's block) per (SAE, tokens) group."""
    start = time.perf_counter()
    pixel_values = engine.preprocess([job.image for job in jobs])
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[(job.sae_id, job.tokens)].append(i)
    results: list[EncodeResult | None] = [None] * len(jobs)
    for (sae_id, tokens), items in groups.items():
        sae = engine.sae(sae_id)
        hidden = engine.steerer.block_output(pixel_values[items], engine.steerer.block_index[sae_id])
        x = hidden[:, token_mask(tokens, hidden.shape[1], hidden.device)].float()
        latents = sae.encode(x)
        for row, i in enumerate(items):
            stats = reconstruction_stats(sae, x[row], latents[row])
            results[i] = EncodeResult(
                latents=top_latents(latents[row], jobs[i].reduce, jobs[i].top_k),
                l0=stats.l0,
                fvu=stats.fvu if x.shape[1] > 1 else None,
            )
    elapsed = time.perf_counter() - start
    for index, result in enumerate(results):
        result.timings_s = {"encode": elapsed}
        result.slot = BatchSlot(len(jobs), index)
    return results
