"""The HTTP API's request and response models; FastAPI turns them into /openapi.json and /docs.

Interventions reuse `sae_modules.intervention_spec.Intervention`, so the CLI, the engine and the
API accept exactly the same edits. Limits that depend on configuration (prompt length,
max_tokens, number of interventions) are checked by the routes, which know the settings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from sae_modules.intervention_spec import Intervention
from service.engine.types import LatentChange, OutputType

_IMAGE_DOC = "A data URL (data:image/png;base64,...) or bare base64 of a PNG, JPEG, WebP, GIF or BMP image."


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Request):
    max_tokens: PositiveInt | None = Field(None, description="Tokens to generate; default 64, capped by config.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class SteerRequest(SamplingFields):
    """Steer one image: the prompt is answered with the given latents edited inside the vision tower."""

    prompt: str = Field(min_length=1, examples=["Describe the image."])
    image: str = Field(min_length=1, description=_IMAGE_DOC)
    sae: str | None = Field(None, description="SAE id from GET /v1/saes; the default SAE when absent.")
    interventions: list[Intervention] = Field(default_factory=list)
    types: list[OutputType] = Field(
        default_factory=lambda: ["STEERED"], min_length=1, max_length=2,
        description="Which outputs to return; both share one tower pass up to the SAE layer.",
    )
    use_error_term: bool = Field(
        False, description="Keep the SAE's reconstruction error (edit = identity when nothing is clamped)."
    )
    pre_zero: bool = Field(False, description="Zero every latent before applying the interventions.")

    @field_validator("types")
    @classmethod
    def _unique(cls, types: list[OutputType]) -> list[OutputType]:
        if len(set(types)) != len(types):
            raise ValueError("types must not repeat")
        return types


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SteerOutput(BaseModel):
    type: OutputType
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class SAEMetrics(BaseModel):
    l0: float | None = Field(description="Mean active latents per token of the unedited encode.")
    fvu: float | None = Field(description="Fraction of variance unexplained by the unedited reconstruction.")
    latents: list[LatentChange] = Field(default_factory=list, description="Each edited latent, before and after.")


class SteerMetrics(BaseModel):
    timings_s: dict[str, float] = Field(description="Seconds per stage: decode_image, tower, sae, projector, generate.")
    sae: SAEMetrics
    embed_cosine: float | None = Field(None, description="Mean cosine of steered vs unsteered image embeddings.")


class SteerResponse(BaseModel):
    id: str
    object: Literal["steer"] = "steer"
    created: int
    model: str
    sae: str
    outputs: list[SteerOutput]
    metrics: SteerMetrics


class EncodeRequest(_Request):
    """Which SAE latents fire on an image."""

    image: str = Field(min_length=1, description=_IMAGE_DOC)
    sae: str | None = None
    top_k: PositiveInt = Field(16, description="How many of the strongest latents to return.")
    tokens: Literal["all", "cls", "patches"] = "all"
    reduce: Literal["mean", "max"] = Field("mean", description="How a latent's per-token values become one.")


class LatentValue(BaseModel):
    latent: int
    value: float


class EncodeResponse(BaseModel):
    id: str
    object: Literal["encoding"] = "encoding"
    model: str
    sae: str
    latents: list[LatentValue]
    l0: float = Field(description="Mean active latents per selected token.")
    fvu: float | None = Field(
        description="Fraction of variance unexplained over the selected tokens; null for a single token."
    )


class SAEInfo(BaseModel):
    id: str
    object: Literal["sae"] = "sae"
    layer: int
    n_latents: int
    architecture: str
    d_in: int
    default: bool


class SAEList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SAEInfo]


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlm-steer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Steering(_Request):
    """The `steering` extension of chat completions: same meaning as in /v1/steer."""

    sae: str | None = None
    interventions: list[Intervention] = Field(default_factory=list)
    use_error_term: bool = False
    pre_zero: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str = Field(min_length=1, description="A data URL; http(s) only if the server enables remote images.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class ChatCompletionRequest(SamplingFields):
    """OpenAI chat completions, one image per conversation, plus optional `steering`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Model id from /v1/models; the served model when absent.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = Field(None, description="Alias of max_tokens (newer OpenAI name).")
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: Literal[False] = Field(False, description="Streaming is not supported.")
    steering: Steering | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    steering_metrics: SteerMetrics | None = None


class Health(BaseModel):
    status: Literal["ok", "loading"]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail

