"""The engine's contract: what the steerer and the generators take and give.

The HTTP layer, Ray deployments, the CLI and the benchmarks all speak these types, so a backend
(transformers or vLLM) or a deployment layout can change without touching its callers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from sae_modules.intervention_spec import Intervention

OutputType = Literal["STEERED", "DEFAULT"]
Conversation = list[dict[str, Any]]
"""HF chat format: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}],
with exactly one image part in the whole conversation."""


def user_turn(prompt: str) -> Conversation:
    """The one-turn conversation /v1/steer and the CLI send: the image, then the prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


@dataclass
class SteerSpec:
    """One image's edits. `sae_id` None means the registry's default SAE."""

    interventions: list[Intervention] = field(default_factory=list)
    sae_id: str | None = None
    use_error_term: bool = False
    pre_zero: bool = False
    want_steered: bool = True
    want_default: bool = False
    want_stats: bool = True
    """L0, FVU and the embedding cosine cost a full SAE encode (and, for the cosine, a default pass);
    the per-latent before/after values are always reported."""


class LatentChange(BaseModel):
    """An edited latent's mean value over the tokens it was edited on, before and after the edit."""

    latent: int
    before: float
    after: float


class SteerStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    l0: float | None = Field(description="Mean active latents per token of the unedited encode (None: not asked).")
    fvu: float | None = Field(
        description="Fraction of variance unexplained by the unedited reconstruction, over the image's tokens "
        "(None: not asked)."
    )
    latents: list[LatentChange] = Field(default_factory=list)
    embed_cosine: float | None = Field(None, description="Mean cosine, steered vs unsteered image embeddings.")


@dataclass
class SteeredEmbeds:
    """Image embeddings [P, H] ready for the language model, on the engine's device and dtype."""

    steered: Tensor | None
    default: Tensor | None
    stats: SteerStats
    timings_s: dict[str, float]


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


@dataclass
class GenerationRequest:
    conversation: Conversation
    image_embeds: Tensor
    params: SamplingParams


@dataclass
class GenerationOutput:
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    seconds: float


class Generator(Protocol):
    """A language-model backend that takes image embeddings instead of pixels."""

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]: ...
