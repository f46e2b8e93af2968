"""The FastAPI app: request checks against the config and the SAE registry, then one call to the backend.

The app knows nothing of Ray. A `Backend` (see `service.deployments`) turns jobs into results,
whether the steerer and generator share a replica or not; everything a client can get wrong is
caught here first, so a bad request never reaches a model replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Protocol

from fastapi import FastAPI, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from sae_modules.intervention_spec import Intervention
from service.api import schemas
from service.api.errors import APIError, install_error_handlers
from service.api.guard import Guard
from service.api.images import load_image
from service.config import Limits, ServiceSettings
from service.engine.types import Conversation, GenerationOutput, SamplingParams, SteerSpec, user_turn
from service.metrics import BATCH_SIZE, INTERVENTIONS, SAE_INFO, exposition, observe_sae, observe_stages
from service.pipeline import BatchSlot, EncodeJob, EncodeResult, ServingInfo, SteerJob, SteerResult
from service.ui import mount_ui

DEFAULT_MAX_TOKENS = 64


class Backend(Protocol):
    """What the routes need from the model side; implemented over Ray handles in `service.deployments`."""

    async def info(self) -> ServingInfo: ...

    async def ready(self) -> bool: ...

    async def steer(self, job: SteerJob) -> SteerResult: ...

    async def encode(self, job: EncodeJob) -> EncodeResult: ...


def _check_interventions(interventions: list[Intervention], info: ServingInfo, sae_id: str, limits: Limits,
                         where: str) -> None:
    if len(interventions) > limits.max_interventions:
        raise APIError(422, f"{len(interventions)} interventions exceed the limit {limits.max_interventions}",
                       where.rstrip("."))
    sae = info.sae(sae_id)
    for i, intervention in enumerate(interventions):
        intervention.check_against(sae.n_latents, info.n_tokens, limits.value_bound, where=f"{where}{i}.")


def _resolve_sae(info: ServingInfo, sae_id: str | None, param: str) -> str:
    if sae_id is None:
        return info.default_sae
    if sae_id not in info.sae_ids:
        raise APIError(404, f"unknown SAE {sae_id!r}; GET /v1/saes lists the loaded ones", param)
    return sae_id


def _sampling(
    fields: schemas.SamplingFields, max_tokens: int | None, limits: Limits, stop: list[str]
) -> SamplingParams:
    tokens = max_tokens or DEFAULT_MAX_TOKENS
    if tokens > limits.max_tokens:
        raise APIError(422, f"max_tokens {tokens} exceeds the limit {limits.max_tokens}", "max_tokens")
    return SamplingParams(max_tokens=tokens, temperature=fields.temperature, top_p=fields.top_p, seed=fields.seed,
                          stop=stop)


def _observe_batch(slot: BatchSlot | None) -> None:
    """One batch-size sample per batch: only the batch's first result records it."""
    if slot is not None and slot.index == 0:
        BATCH_SIZE.observe(slot.size)


def _metrics(result: SteerResult, decode_s: float) -> schemas.SteerMetrics:
    timings = {"decode_image": decode_s, **result.timings_s}
    observe_stages(timings)
    observe_sae(result.stats.l0, result.stats.fvu)
    _observe_batch(result.slot)
    return schemas.SteerMetrics(
        timings_s=timings,
        sae=schemas.SAEMetrics(l0=result.stats.l0, fvu=result.stats.fvu, latents=result.stats.latents),
        embed_cosine=result.stats.embed_cosine,
    )


def _usage(output: GenerationOutput) -> schemas.Usage:
    return schemas.Usage(prompt_tokens=output.prompt_tokens, completion_tokens=output.completion_tokens,
                         total_tokens=output.prompt_tokens + output.completion_tokens)


def _conversation(messages: list[schemas.ChatMessage], limits: Limits) -> tuple[Conversation, str, str]:
    """HF chat format with one image part, the image's URL, and that URL's field path (for errors)."""
    if len(messages) > limits.max_messages:
        raise APIError(422, f"{len(messages)} messages exceed the limit {limits.max_messages}", "messages")
    conversation: Conversation = []
    images: list[tuple[str, str]] = []
    chars = 0
    for m, message in enumerate(messages):
        parts = [schemas.TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
            else message.content
        content = []
        for p, part in enumerate(parts):
            if isinstance(part, schemas.TextPart):
                chars += len(part.text)
                content.append({"type": "text", "text": part.text})
            else:
                if message.role != "user":
                    raise APIError(400, "images may only appear in user messages",
                                   f"messages.{m}.content.{p}")
                images.append((part.image_url.url, f"messages.{m}.content.{p}.image_url.url"))
                content.append({"type": "image"})
        conversation.append({"role": message.role, "content": content})
    if len(images) != 1:
        raise APIError(400, f"the conversation must contain exactly one image_url part, found {len(images)}",
                       "messages")
    if chars > limits.max_prompt_chars:
        raise APIError(422, f"the messages hold {chars} characters, more than the limit {limits.max_prompt_chars}",
                       "messages")
    return conversation, *images[0]


def create_app(settings: ServiceSettings, backend: Backend) -> FastAPI:
    limits = settings.limits
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    app = FastAPI(
        title="vlm-steer",
        version="0.1.0",
        description="Steer a vision-language model by editing sparse-autoencoder latents inside its vision tower. "
        "Errors are OpenAI-style JSON: {\"error\": {\"type\", \"message\", \"param\"}}.",
        responses={code: {"model": schemas.ErrorBody} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)},
    )
    install_error_handlers(app)
    app.add_middleware(Guard, limits=limits, api_keys=[key.get_secret_value() for key in settings.api_keys])
    mount_ui(app, settings.ui_examples_dir, settings.report_dir)

    async def served() -> ServingInfo:
        try:
            info = await backend.info()
        except APIError:
            raise
        except Exception as exc:
            raise APIError(503, f"models are not loaded yet: {type(exc).__name__}",
                           headers={"Retry-After": str(limits.retry_after_s)}) from exc
        for sae in info.saes:
            SAE_INFO.labels(sae=sae.id, layer=str(sae.layer), n_latents=str(sae.n_latents)).set(1)
        return info

    async def bounded(call):
        try:
            return await asyncio.wait_for(call, timeout=limits.request_timeout_s)
        except TimeoutError as exc:
            raise APIError(504, f"the request took longer than {limits.request_timeout_s:g} s") from exc

    async def decode(ref: str, param: str) -> tuple[Image.Image, float]:
        start = time.perf_counter()
        image = await run_in_threadpool(load_image, ref, limits, param)
        return image, time.perf_counter() - start

    @app.post("/v1/steer", response_model=schemas.SteerResponse, tags=["steering"])
    async def steer(request: schemas.SteerRequest) -> schemas.SteerResponse:
        """Answer `prompt` about `image` with SAE latents edited in the vision tower; optionally also unedited."""
        if len(request.prompt) > limits.max_prompt_chars:
            raise APIError(422, f"prompt has {len(request.prompt)} characters, more than {limits.max_prompt_chars}",
                           "prompt")
        info = await served()
        sae_id = _resolve_sae(info, request.sae, "sae")
        _check_interventions(request.interventions, info, sae_id, limits, "interventions.")
        params = _sampling(request, request.max_tokens, limits, [])
        image, decode_s = await decode(request.image, "image")
        spec = SteerSpec(interventions=request.interventions, sae_id=sae_id, use_error_term=request.use_error_term,
                         pre_zero=request.pre_zero, want_steered="STEERED" in request.types,
                         want_default="DEFAULT" in request.types)
        INTERVENTIONS.observe(len(request.interventions))
        result = await bounded(backend.steer(SteerJob(image, user_turn(request.prompt), spec, params)))
        return schemas.SteerResponse(
            id=f"steer-{uuid.uuid4().hex}", created=int(time.time()), model=info.model_id, sae=sae_id,
            outputs=[schemas.SteerOutput(type=kind, text=result.outputs[kind].text,
                                         finish_reason=result.outputs[kind].finish_reason,
                                         usage=_usage(result.outputs[kind]))
                     for kind in request.types],
            metrics=_metrics(result, decode_s),
        )

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion, tags=["openai"])
    async def chat(request: schemas.ChatCompletionRequest) -> schemas.ChatCompletion:
        """OpenAI-compatible chat completion over one image, steered when `steering` is given."""
        info = await served()
        if request.model is not None and request.model != info.model_id:
            raise APIError(404, f"unknown model {request.model!r}; GET /v1/models lists it", "model")
        conversation, image_ref, image_param = _conversation(request.messages, limits)
        steering = request.steering
        if steering is not None:
            sae_id = _resolve_sae(info, steering.sae, "steering.sae")
            _check_interventions(steering.interventions, info, sae_id, limits, "steering.interventions.")
            spec = SteerSpec(interventions=steering.interventions, sae_id=sae_id,
                             use_error_term=steering.use_error_term, pre_zero=steering.pre_zero)
            INTERVENTIONS.observe(len(steering.interventions))
        else:
            spec = SteerSpec(sae_id=info.default_sae, want_steered=False, want_default=True, want_stats=False)
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        params = _sampling(request, request.max_completion_tokens or request.max_tokens, limits, stop)
        image, decode_s = await decode(image_ref, image_param)
        result = await bounded(backend.steer(SteerJob(image, conversation, spec, params)))
        kind = "STEERED" if spec.want_steered else "DEFAULT"
        output = result.outputs[kind]
        metrics = _metrics(result, decode_s)
        return schemas.ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=info.model_id,
            choices=[schemas.ChatChoice(index=0, message=schemas.AssistantMessage(content=output.text),
                                        finish_reason=output.finish_reason)],
            usage=_usage(output), steering_metrics=metrics if steering is not None else None,
        )

    @app.post("/v1/encode", response_model=schemas.EncodeResponse, tags=["steering"])
    async def encode(request: schemas.EncodeRequest) -> schemas.EncodeResponse:
        """The strongest SAE latents on an image (pick latents to steer with)."""
        info = await served()
        sae_id = _resolve_sae(info, request.sae, "sae")
        if request.top_k > limits.max_top_k:
            raise APIError(422, f"top_k {request.top_k} exceeds the limit {limits.max_top_k}", "top_k")
        image, decode_s = await decode(request.image, "image")
        result = await bounded(backend.encode(EncodeJob(image, sae_id, request.tokens, request.reduce,
                                                        request.top_k)))
        observe_stages({"decode_image": decode_s, **result.timings_s})
        _observe_batch(result.slot)
        return schemas.EncodeResponse(
            id=f"enc-{uuid.uuid4().hex}", model=info.model_id, sae=sae_id,
            latents=[schemas.LatentValue(latent=k, value=v) for k, v in result.latents], l0=result.l0,
            fvu=result.fvu,
        )

    @app.get("/v1/saes", response_model=schemas.SAEList, tags=["registry"])
    async def saes() -> schemas.SAEList:
        info = await served()
        return schemas.SAEList(data=info.saes)

    @app.get("/v1/models", response_model=schemas.ModelList, tags=["registry"])
    async def models() -> schemas.ModelList:
        info = await served()
        return schemas.ModelList(data=[schemas.ModelInfo(id=info.model_id, created=info.created)])

    @app.get("/healthz", response_model=schemas.Health, tags=["operations"])
    async def healthz() -> schemas.Health:
        """The ingress process is up (liveness)."""
        return schemas.Health(status="ok")

    @app.get("/readyz", response_model=schemas.Health, tags=["operations"],
             responses={503: {"model": schemas.ErrorBody}})
    async def readyz() -> schemas.Health:
        """200 only when the model and every SAE are loaded and the model replicas answer."""
        try:
            ready = await asyncio.wait_for(backend.ready(), timeout=5.0)
        except Exception:  # noqa: BLE001 - whatever a replica raises, it is not ready
            ready = False
        if not ready:
            raise APIError(503, "models are loading", headers={"Retry-After": str(limits.retry_after_s)})
        await served()
        return schemas.Health(status="ok")

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text exposition of this ingress replica's registry."""
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    return app
