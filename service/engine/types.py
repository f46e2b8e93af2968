"""The engine's contract: the jobs it takes, the results it gives, the stages it times.

The HTTP schemas, the Ray deployment, the CLI, `evaluate steering` and the benchmarks all speak
these types, so a backend (transformers or vLLM) can change without touching its callers, and
the API's response bodies are these same models (see `service.api.schemas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from sae_modules.intervention_spec import Intervention, TokenScope

OutputType = Literal["STEERED", "DEFAULT"]
FinishReason = Literal["stop", "length"]
Conversation = list[dict[str, Any]]
"""HF chat format: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}],
with exactly one image part in the whole conversation."""


class Stage(StrEnum):
    """Every timed stage of a request. The engine times these, the API reports them under these names
    and the Prometheus exporter labels `steer_stage_seconds` with them: one list, used by all three."""

    DECODE_IMAGE = "decode_image"
    """Ingress: base64 and image decoding."""
    PREPROCESS = "preprocess"
    """Replica: LLaVA's image processor (resize, crop, normalise) for the whole batch."""
    TOWER = "tower"
    """Replica: vision tower and projector, without the SAE edit inside it."""
    SAE = "sae"
    """Replica: the SAE encode and edit inside the tower pass."""
    GENERATE = "generate"
    """Replica: the language model, until this request's last output finished."""
    ENCODE = "encode"
    """Replica: tower up to the SAE's block and the SAE encode (/v1/encode)."""


Timings = dict[Stage, float]


def user_turn(prompt: str) -> Conversation:
    """The one-turn conversation /v1/steer and the CLI send: the image, then the prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def finite_or_none(value: float | None) -> float | None:
    """A statistic as JSON can carry it: NaN and infinities become null (the schemas say which fields may be)."""
    return value if value is not None and math.isfinite(value) else None


@dataclass
class SteerSpec:
    """One image's edits. `sae_id` None means the engine's default SAE."""

    interventions: list[Intervention] = field(default_factory=list)
    sae_id: str | None = None
    use_error_term: bool = False
    pre_zero: bool = False
    want_steered: bool = True
    want_default: bool = False
    want_stats: bool = True
    """L0, FVU and the embedding cosine cost a full SAE encode (and, for the cosine, a default pass);
    the per-latent before/after values are always reported."""

    @property
    def output_types(self) -> list[OutputType]:
        return [kind for kind, wanted in (("STEERED", self.want_steered), ("DEFAULT", self.want_default)) if wanted]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


@dataclass
class SteerJob:
    """One steering request as the engine takes it: an image, a conversation, edits and sampling."""

    image: Image.Image
    conversation: Conversation
    spec: SteerSpec = field(default_factory=SteerSpec)
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class EncodeJob:
    """Which latents of `sae_id` (None: the default SAE) fire on an image, reduced over `tokens`."""

    image: Image.Image
    sae_id: str | None = None
    tokens: TokenScope = "all"
    reduce: Literal["mean", "max"] = "mean"
    top_k: int = 16


class JobError(BaseModel):
    """One job's failure, returned in its place so the rest of its batch is unaffected.

    `param` is the offending field relative to the job (e.g. `interventions`); the HTTP layer
    prefixes it with where the job came from (e.g. `steering.` in chat completions)."""

    status: int = Field(ge=400, le=599)
    message: str
    param: str | None = None


class LatentChange(BaseModel):
    """An edited latent's mean value over the tokens it was edited on, before and after the edit."""

    model_config = ConfigDict(allow_inf_nan=False)

    latent: int
    before: float
    after: float


class LatentValue(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    latent: int
    value: float


class SAEStats(BaseModel):
    """How the SAE saw one image: the unedited encode's L0 and FVU, and each edited latent."""

    model_config = ConfigDict(allow_inf_nan=False)

    l0: float | None = Field(None, description="Mean active latents per token of the unedited encode "
                                               "(null: not asked for).")
    fvu: float | None = Field(None, description="Fraction of variance unexplained by the unedited "
                                                "reconstruction (null: not asked for, or a single token).")
    latents: list[LatentChange] = Field(default_factory=list, description="Each edited latent, before and after.")


class SAEInfo(BaseModel):
    id: str
    object: Literal["sae"] = "sae"
    layer: int = Field(description="The tower block the SAE reads (resolved, so -2 on 24 blocks reads 22).")
    n_latents: int
    architecture: str
    d_in: int
    default: bool


class ServingInfo(BaseModel):
    """What a model replica has loaded, as the ingress needs it to check requests before sending them."""

    model_id: str
    checkpoint: str = Field(description="The model's directory or hub id: the ingress loads its processor from it.")
    created: int
    n_tokens: int = Field(description="Tokens of the tower's sequence (CLS + patches).")
    image_tokens: int = Field(description="Image embedding rows one image takes in the prompt.")
    context_tokens: int = Field(description="The language model's context: prompt + image + answer tokens.")
    default_sae: str
    saes: list[SAEInfo]

    @property
    def sae_ids(self) -> list[str]:
        return [sae.id for sae in self.saes]

    def sae(self, sae_id: str) -> SAEInfo:
        return next(sae for sae in self.saes if sae.id == sae_id)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SteerOutput(BaseModel):
    type: OutputType
    text: str
    finish_reason: FinishReason
    usage: Usage


class SteerMetrics(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    timings_s: dict[Stage, float] = Field(description="Seconds per stage (see `Stage`).")
    sae: SAEStats
    embed_cosine: float | None = Field(None, description="Mean cosine of steered vs unsteered image embeddings "
                                                         "(null: not asked for, or undefined).")


class SteerResult(BaseModel):
    """A finished steering job: one output per asked type (in the order STEERED, DEFAULT) and metrics."""

    sae: str
    outputs: list[SteerOutput]
    metrics: SteerMetrics
    batch_size: int = Field(1, description="Jobs in the batch this one ran in.")
    batch_index: int = Field(0, description="This job's place among the batch's jobs that reached generation "
                                            "(0 on exactly one of them: the one to count the batch by).")

    def output(self, kind: OutputType) -> SteerOutput:
        return next(out for out in self.outputs if out.type == kind)


class EncodeResult(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    sae: str
    latents: list[LatentValue] = Field(description="The strongest latents, strongest first.")
    l0: float = Field(description="Mean active latents per selected token.")
    fvu: float | None = Field(description="Fraction of variance unexplained over the selected tokens; "
                                          "null for a single token.")
    timings_s: dict[Stage, float] = Field(default_factory=dict)
    batch_size: int = 1
    batch_index: int = 0


@dataclass
class TextDelta:
    """New answer text of one output of a streamed job."""

    type: OutputType
    text: str


StreamEvent = TextDelta | SteerResult | JobError
"""What a streamed job yields: text deltas as tokens arrive, then its result (or error) last."""


@dataclass
class SteeredEmbeds:
    """Image embeddings [P, H] ready for the language model, on the engine's device and dtype."""

    steered: Tensor | None
    default: Tensor | None
    stats: SAEStats
    embed_cosine: float | None
    timings_s: Timings


@dataclass
class GenerationRequest:
    conversation: Conversation
    image_embeds: Tensor
    params: SamplingParams


@dataclass
class GenerationOutput:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class GenerationListener(Protocol):
    """Hears a generation as it happens, per request index: text as it is made, each request's end.

    `streams` says whose text is wanted as it is made (decoding every step costs); `cancelled` is
    polled between tokens: a request whose client left stops there and frees its slot."""

    def streams(self, index: int) -> bool: ...

    def delta(self, index: int, text: str) -> None: ...

    def finished(self, index: int, output: GenerationOutput) -> None: ...

    def cancelled(self, index: int) -> bool: ...


class JobListener(Protocol):
    """Hears a batch of steering jobs, per job index: answer text as it is made, then the job's outcome
    the moment it is known (before the rest of the batch finishes); `cancelled` stops a job early."""

    def streams(self, job: int) -> bool: ...

    def delta(self, job: int, kind: OutputType, text: str) -> None: ...

    def done(self, job: int, outcome: SteerResult | JobError) -> None: ...

    def cancelled(self, job: int) -> bool: ...


class TextGenerator(Protocol):
    """A language-model backend that takes image embeddings instead of pixels.

    `generate` returns every request's output; with a listener it also reports each request's text
    as it is made and each request's end as soon as it happens (a short answer need not wait for
    the longest one of its batch)."""

    def generate(self, requests: list[GenerationRequest],
                 listener: GenerationListener | None = None) -> list[GenerationOutput]: ...

    def healthy(self) -> bool: ...
