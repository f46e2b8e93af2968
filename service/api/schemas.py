"""The HTTP API's request and response models; FastAPI turns them into /openapi.json and /docs.

Interventions reuse `sae_modules.intervention_spec.Intervention`, so the CLI, the engine and the
API accept exactly the same edits, and responses are built from the engine's own result types
(`service.engine.types`), so the API reports exactly what the engine computed. Limits that depend
on configuration (prompt length, max_tokens, list sizes) are checked by the routes.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from sae_modules.intervention_spec import Intervention
from service.engine.types import (
    FinishReason,
    LatentValue,
    OutputType,
    SAEInfo,
    SteerMetrics,
    SteerOutput,
    Usage,
)

_IMAGE_DOC = "A data URL (data:image/png;base64,...) or bare base64 of a PNG, JPEG, WebP, GIF or BMP image."


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SamplingFields(_Request):
    max_tokens: PositiveInt | None = Field(
        None, description="Tokens to generate; default 64 (or the configured limit if lower).")
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
    stream: bool = Field(False, description="Server-sent events: text per output type as it is made, then the "
                                            "full response.")

    @field_validator("types")
    @classmethod
    def _unique(cls, types: list[OutputType]) -> list[OutputType]:
        if len(set(types)) != len(types):
            raise ValueError("types must not repeat")
        return types


class SteerResponse(BaseModel):
    id: str
    object: Literal["steer"] = "steer"
    created: int
    model: str
    sae: str
    interventions: list[Intervention] = Field(
        default_factory=list, description="The edits applied: relative values (unit max, mean, p99) resolved to raw.")
    outputs: list[SteerOutput]
    metrics: SteerMetrics


class SteerDelta(BaseModel):
    """A streamed /v1/steer event (`event: delta`): new text of one output type."""

    type: OutputType
    text: str


class EncodeRequest(_Request):
    """Which SAE latents fire on an image."""

    image: str = Field(min_length=1, description=_IMAGE_DOC)
    sae: str | None = None
    top_k: PositiveInt = Field(16, description="How many of the strongest latents to return.")
    tokens: Literal["all", "cls", "patches"] = "all"
    reduce: Literal["mean", "max"] = Field("mean", description="How a latent's per-token values become one.")


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


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` and no choices.")


class ChatCompletionRequest(SamplingFields):
    """OpenAI chat completions, one image per conversation, plus optional `steering`."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Model id from /v1/models; the served model when absent.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = Field(None, description="Alias of max_tokens (newer OpenAI name).")
    stop: str | list[str] | None = Field(None, description="Strings that end the answer (count and length capped "
                                                           "by config).")
    n: Literal[1] = 1
    stream: bool = Field(False, description="Server-sent events in OpenAI's chat.completion.chunk format.")
    stream_options: StreamOptions | None = None
    steering: Steering | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    steering_metrics: SteerMetrics | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One streamed chat event. The last chunk with a choice carries `finish_reason` and, when the request
    asked for steering, `steering_metrics`; with `stream_options.include_usage` a final chunk carries `usage`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
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

