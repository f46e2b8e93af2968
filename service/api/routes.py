"""The FastAPI app: every check a request can fail, then one call to the backend, answered whole or streamed.

The app knows nothing of Ray. A `Backend` (see `service.deployments`) turns jobs into results.
Everything a client can get wrong is caught here first (limits, the SAE registry, interventions,
the chat template, the image placeholder, the context length), so a bad request never reaches a
model replica; what only the replica can know (edited values past the bound) comes back as that
job's own `JobError`, answered with its status and field.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar

from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from sae_modules.intervention_spec import Intervention
from service.api import schemas
from service.api.dictionary import (
    Dictionaries,
    dictionary_router,
    registry_dictionaries,
    resolve_interventions,
)
from service.api.errors import APIError, error_type, install_error_handlers
from service.api.guard import Guard
from service.api.images import load_image
from service.api.prompt_check import PromptChecker
from service.config import Limits, ServiceSettings
from service.engine.types import (
    Conversation,
    EncodeJob,
    EncodeResult,
    JobError,
    OutputType,
    SamplingParams,
    ServingInfo,
    Stage,
    SteerJob,
    SteerMetrics,
    SteerResult,
    SteerSpec,
    StreamEvent,
    TextDelta,
    user_turn,
)
from service.metrics import (
    BATCH_SIZE,
    FIRST_TOKEN,
    INTERVENTIONS,
    SAE_INFO,
    exposition,
    observe_sae,
    observe_stages,
)
from service.ui import mount_ui

DEFAULT_MAX_TOKENS = 64
T = TypeVar("T")


class Backend(Protocol):
    """What the routes need from the model side; implemented over Ray handles in `service.deployments`."""

    async def info(self) -> ServingInfo: ...

    async def ready(self) -> bool: ...

    async def steer(self, job: SteerJob) -> SteerResult | JobError: ...

    def steer_stream(self, job: SteerJob) -> AsyncIterator[StreamEvent]: ...

    async def encode(self, job: EncodeJob) -> EncodeResult | JobError: ...


def _check_interventions(interventions: list[Intervention], info: ServingInfo, sae_id: str, limits: Limits,
                         where: str, dictionaries: Dictionaries) -> list[Intervention]:
    """The interventions with relative values resolved to raw ones (latent dictionary), each checked."""
    if len(interventions) > limits.max_interventions:
        raise APIError(422, f"{len(interventions)} interventions exceed the limit {limits.max_interventions}",
                       where.rstrip("."))
    interventions = resolve_interventions(interventions, dictionaries, sae_id, where)
    sae = info.sae(sae_id)
    for i, intervention in enumerate(interventions):
        intervention.check_against(sae.n_latents, info.n_tokens, limits.value_bound, where=f"{where}{i}.")
    return interventions


def _resolve_sae(info: ServingInfo, sae_id: str | None, param: str) -> str:
    if sae_id is None:
        return info.default_sae
    if sae_id not in info.sae_ids:
        raise APIError(404, f"unknown SAE {sae_id!r}: this engine holds {info.sae_ids}; GET /v1/saes lists them",
                       param)
    return sae_id


def _stop_strings(stop: str | list[str] | None, limits: Limits) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop_strings:
        raise APIError(422, f"{len(stops)} stop strings exceed the limit {limits.max_stop_strings}", "stop")
    for i, text in enumerate(stops):
        if not 0 < len(text) <= limits.max_stop_chars:
            raise APIError(422, f"stop strings must have 1 to {limits.max_stop_chars} characters, not {len(text)}",
                           f"stop.{i}")
    return stops


def _sampling(fields: schemas.SamplingFields, max_tokens: int | None, limits: Limits,
              stop: list[str]) -> SamplingParams:
    tokens = max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if tokens > limits.max_tokens:
        raise APIError(422, f"max_tokens {tokens} exceeds the limit {limits.max_tokens}", "max_tokens")
    return SamplingParams(max_tokens=tokens, temperature=fields.temperature, top_p=fields.top_p, seed=fields.seed,
                          stop=stop)


def _job_failed(error: JobError, steering: bool = False) -> APIError:
    """A replica's per-job error as the client's HTTP error; chat's steering fields sit under `steering.`."""
    param = error.param
    if steering and param is not None and param.split(".")[0] in ("interventions", "sae"):
        param = f"steering.{param}"
    return APIError(error.status, error.message, param)


def _observe(result: SteerResult | EncodeResult, timings: dict[Stage, float]) -> None:
    observe_stages(timings)
    if result.batch_index == 0:  # one batch-size sample per batch
        BATCH_SIZE.observe(result.batch_size)


def _metrics(result: SteerResult, decode_s: float) -> SteerMetrics:
    metrics = result.metrics.model_copy(update={"timings_s": {Stage.DECODE_IMAGE: decode_s,
                                                               **result.metrics.timings_s}})
    _observe(result, metrics.timings_s)
    observe_sae(metrics.sae.l0, metrics.sae.fvu)
    return metrics


def _content_parts(message: schemas.ChatMessage, m: int, limits: Limits) -> list[schemas.TextPart | schemas.ImagePart]:
    if isinstance(message.content, str):
        return [schemas.TextPart(type="text", text=message.content)]
    if len(message.content) > limits.max_content_parts:
        raise APIError(422, f"{len(message.content)} content parts exceed the limit {limits.max_content_parts}",
                       f"messages.{m}.content")
    return message.content


def _conversation(messages: list[schemas.ChatMessage], limits: Limits,
                  checker: PromptChecker) -> tuple[Conversation, str, str]:
    """HF chat format with one image part, the image's URL, and that URL's field path (for errors)."""
    if len(messages) > limits.max_messages:
        raise APIError(422, f"{len(messages)} messages exceed the limit {limits.max_messages}", "messages")
    conversation: Conversation = []
    images: list[tuple[str, str]] = []
    chars = 0
    for m, message in enumerate(messages):
        content = []
        for p, part in enumerate(_content_parts(message, m, limits)):
            if isinstance(part, schemas.TextPart):
                chars += len(part.text)
                where = f"messages.{m}.content" + ("" if isinstance(message.content, str) else f".{p}.text")
                checker.refuse_image_token(part.text, where)
                content.append({"type": "text", "text": part.text})
            else:
                if message.role != "user":
                    raise APIError(400, "images may only appear in user messages", f"messages.{m}.content.{p}")
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


def _sse(data: BaseModel | dict | str, event: str | None = None) -> str:
    body = data if isinstance(data, str) else json.dumps(data if isinstance(data, dict) else
                                                        data.model_dump(mode="json"))
    return (f"event: {event}\n" if event else "") + f"data: {body}\n\n"


def _error_body(error: APIError) -> dict:
    return {"error": {"type": error_type(error.status), "message": error.message, "param": error.param,
                      "code": None}}


def create_app(settings: ServiceSettings, backend: Backend) -> FastAPI:
    limits = settings.limits
    app = FastAPI(
        title="vlm-steer",
        version="0.2.0",
        description="Steer a vision-language model by editing sparse-autoencoder latents inside its vision tower. "
        "Errors are OpenAI-style JSON: {\"error\": {\"type\", \"message\", \"param\"}}. With \"stream\": true, "
        "/v1/steer and /v1/chat/completions answer with server-sent events.",
        responses={code: {"model": schemas.ErrorBody} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)},
    )
    install_error_handlers(app)
    app.add_middleware(Guard, limits=limits, api_keys=[key.get_secret_value() for key in settings.api_keys])
    mount_ui(app, settings.ui_examples_dir, settings.report_dir)
    dictionaries = registry_dictionaries(settings)
    app.include_router(dictionary_router(dictionaries, limits.max_top_k))
    checkers: dict[str, PromptChecker] = {}
    loading = asyncio.Lock()  # one load: concurrent first imports of transformers' lazy modules can fail

    async def served() -> tuple[ServingInfo, PromptChecker]:
        """The replica's serving info and a prompt checker with the same model's processor."""
        try:
            info = await backend.info()
            async with loading:
                if info.checkpoint not in checkers:
                    checkers[info.checkpoint] = await run_in_threadpool(PromptChecker.load, info.checkpoint)
        except APIError:
            raise
        except Exception as exc:
            raise APIError(503, f"models are not loaded yet: {type(exc).__name__}",
                           headers={"Retry-After": str(limits.retry_after_s)}) from exc
        for sae in info.saes:
            SAE_INFO.labels(sae=sae.id, layer=str(sae.layer), n_latents=str(sae.n_latents)).set(1)
        return info, checkers[info.checkpoint]

    async def bounded(call: Awaitable[T], timeout_s: float = limits.request_timeout_s) -> T:
        try:
            return await asyncio.wait_for(call, timeout=timeout_s)
        except TimeoutError as exc:
            raise APIError(504, f"the request took longer than {limits.request_timeout_s:g} s") from exc

    async def decode(ref: str, param: str, checker: PromptChecker) -> tuple[Image.Image, float]:
        start = time.perf_counter()
        image = await run_in_threadpool(load_image, ref, limits, param, checker.image_short_side)
        return image, time.perf_counter() - start

    def check_context(info: ServingInfo, checker: PromptChecker, conversation: Conversation,
                      params: SamplingParams, param: str) -> None:
        tokens = checker.prompt_tokens(conversation, info.image_tokens)
        checker.check_context(tokens, params.max_tokens, info.context_tokens, param)

    async def opened(job: SteerJob, steering: bool, endpoint: str, received: float) -> AsyncIterator[StreamEvent]:
        """The job's event stream, opened: its first event is here before any response byte is sent, so a job
        that fails at once (e.g. edits past the bound) is a plain HTTP error, not a broken stream.

        The first text delta records the time to first token, counted from `received` (the handler's start)."""
        start = time.monotonic()
        events = aiter(backend.steer_stream(job))
        timed = False

        def seen(event: StreamEvent) -> StreamEvent:
            nonlocal timed
            if not timed and isinstance(event, TextDelta):
                FIRST_TOKEN.labels(endpoint=endpoint).observe(time.monotonic() - received)
                timed = True
            return event

        first = seen(await bounded(anext(events)))
        if isinstance(first, JobError):
            await events.aclose()
            raise _job_failed(first, steering)

        async def rest() -> AsyncIterator[StreamEvent]:
            try:
                yield first
                while True:
                    remaining = limits.request_timeout_s - (time.monotonic() - start)
                    try:
                        event = await bounded(anext(events), max(remaining, 0.001))
                    except StopAsyncIteration:
                        return
                    yield seen(event)
            finally:
                await events.aclose()

        return rest()

    def streamed(body: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/steer", response_model=schemas.SteerResponse, tags=["steering"],
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "With stream: `event: delta` per new text ({type, text}), then "
                                              "`event: result` with the full response (or `event: error`)."}})
    async def steer(request: schemas.SteerRequest):
        """Answer `prompt` about `image` with SAE latents edited in the vision tower; optionally also unedited."""
        received = time.monotonic()
        if len(request.prompt) > limits.max_prompt_chars:
            raise APIError(422, f"prompt has {len(request.prompt)} characters, more than {limits.max_prompt_chars}",
                           "prompt")
        info, checker = await served()
        checker.refuse_image_token(request.prompt, "prompt")
        sae_id = _resolve_sae(info, request.sae, "sae")
        interventions = _check_interventions(request.interventions, info, sae_id, limits, "interventions.",
                                             dictionaries)
        params = _sampling(request, request.max_tokens, limits, [])
        conversation = user_turn(request.prompt)
        check_context(info, checker, conversation, params, "max_tokens")
        image, decode_s = await decode(request.image, "image", checker)
        spec = SteerSpec(interventions=interventions, sae_id=sae_id, use_error_term=request.use_error_term,
                         pre_zero=request.pre_zero, want_steered="STEERED" in request.types,
                         want_default="DEFAULT" in request.types)
        INTERVENTIONS.observe(len(request.interventions))
        job = SteerJob(image, conversation, spec, params)
        ident, created = f"steer-{uuid.uuid4().hex}", int(time.time())

        def response(result: SteerResult) -> schemas.SteerResponse:
            return schemas.SteerResponse(id=ident, created=created, model=info.model_id, sae=sae_id,
                                         interventions=interventions,
                                         outputs=[result.output(kind) for kind in request.types],
                                         metrics=_metrics(result, decode_s))

        if not request.stream:
            outcome = await bounded(backend.steer(job))
            if isinstance(outcome, JobError):
                raise _job_failed(outcome)
            return response(outcome)
        events = await opened(job, steering=False, endpoint="/v1/steer", received=received)

        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield _sse(schemas.SteerDelta(type=event.type, text=event.text), "delta")
                    elif isinstance(event, JobError):
                        yield _sse(_error_body(_job_failed(event)), "error")
                    else:
                        yield _sse(response(event), "result")
            except APIError as err:
                yield _sse(_error_body(err), "error")

        return streamed(body())

    @app.post("/v1/chat/completions", response_model=schemas.ChatCompletion, tags=["openai"],
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "With stream: chat.completion.chunk events, then `data: [DONE]`."}})
    async def chat(request: schemas.ChatCompletionRequest):
        """OpenAI-compatible chat completion over one image, steered when `steering` is given."""
        received = time.monotonic()
        info, checker = await served()
        if request.model is not None and request.model != info.model_id:
            raise APIError(404, f"unknown model {request.model!r}; GET /v1/models lists it", "model")
        conversation, image_ref, image_param = _conversation(request.messages, limits, checker)
        steering = request.steering
        if steering is not None:
            sae_id = _resolve_sae(info, steering.sae, "steering.sae")
            interventions = _check_interventions(steering.interventions, info, sae_id, limits,
                                                 "steering.interventions.", dictionaries)
            spec = SteerSpec(interventions=interventions, sae_id=sae_id,
                             use_error_term=steering.use_error_term, pre_zero=steering.pre_zero)
            INTERVENTIONS.observe(len(steering.interventions))
        else:
            spec = SteerSpec(sae_id=info.default_sae, want_steered=False, want_default=True, want_stats=False)
        params = _sampling(request, request.max_completion_tokens or request.max_tokens, limits,
                           _stop_strings(request.stop, limits))
        check_context(info, checker, conversation, params,
                      "max_completion_tokens" if request.max_completion_tokens else "max_tokens")
        image, decode_s = await decode(image_ref, image_param, checker)
        job = SteerJob(image, conversation, spec, params)
        kind: OutputType = "STEERED" if spec.want_steered else "DEFAULT"
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not request.stream:
            outcome = await bounded(backend.steer(job))
            if isinstance(outcome, JobError):
                raise _job_failed(outcome, steering=True)
            output, metrics = outcome.output(kind), _metrics(outcome, decode_s)
            return schemas.ChatCompletion(
                id=ident, created=created, model=info.model_id,
                choices=[schemas.ChatChoice(index=0, message=schemas.AssistantMessage(content=output.text),
                                            finish_reason=output.finish_reason)],
                usage=output.usage, steering_metrics=metrics if steering is not None else None,
            )
        events = await opened(job, steering=True, endpoint="/v1/chat/completions", received=received)
        include_usage = request.stream_options is not None and request.stream_options.include_usage

        def chunk(**fields) -> str:
            return _sse(schemas.ChatCompletionChunk(id=ident, created=created, model=info.model_id, **fields))

        async def body() -> AsyncIterator[str]:
            yield chunk(choices=[schemas.ChunkChoice(delta=schemas.ChunkDelta(role="assistant", content=""))])
            try:
                async for event in events:
                    if isinstance(event, TextDelta):
                        yield chunk(choices=[schemas.ChunkChoice(delta=schemas.ChunkDelta(content=event.text))])
                    elif isinstance(event, JobError):
                        yield _sse(_error_body(_job_failed(event, steering=True)))
                        return
                    else:
                        output, metrics = event.output(kind), _metrics(event, decode_s)
                        yield chunk(choices=[schemas.ChunkChoice(delta=schemas.ChunkDelta(),
                                                                 finish_reason=output.finish_reason)],
                                    steering_metrics=metrics if steering is not None else None)
                        if include_usage:
                            yield chunk(choices=[], usage=output.usage)
            except APIError as err:
                yield _sse(_error_body(err))
                return
            yield _sse("[DONE]")

        return streamed(body())

    @app.post("/v1/encode", response_model=schemas.EncodeResponse, tags=["steering"])
    async def encode(request: schemas.EncodeRequest) -> schemas.EncodeResponse:
        """The strongest SAE latents on an image (pick latents to steer with)."""
        info, checker = await served()
        sae_id = _resolve_sae(info, request.sae, "sae")
        if request.top_k > limits.max_top_k:
            raise APIError(422, f"top_k {request.top_k} exceeds the limit {limits.max_top_k}", "top_k")
        image, decode_s = await decode(request.image, "image", checker)
        outcome = await bounded(backend.encode(EncodeJob(image, sae_id, request.tokens, request.reduce,
                                                         request.top_k)))
        if isinstance(outcome, JobError):
            raise _job_failed(outcome)
        _observe(outcome, {Stage.DECODE_IMAGE: decode_s, **outcome.timings_s})
        return schemas.EncodeResponse(id=f"enc-{uuid.uuid4().hex}", model=info.model_id, sae=sae_id,
                                      latents=outcome.latents, l0=outcome.l0, fvu=outcome.fvu)

    @app.get("/v1/saes", response_model=schemas.SAEList, tags=["registry"])
    async def saes() -> schemas.SAEList:
        info, _ = await served()
        return schemas.SAEList(data=info.saes)

    @app.get("/v1/models", response_model=schemas.ModelList, tags=["registry"])
    async def models() -> schemas.ModelList:
        info, _ = await served()
        return schemas.ModelList(data=[schemas.ModelInfo(id=info.model_id, created=info.created)])

    @app.get("/healthz", response_model=schemas.Health, tags=["operations"])
    async def healthz() -> schemas.Health:
        """The ingress process is up (liveness)."""
        return schemas.Health(status="ok")

    @app.get("/readyz", response_model=schemas.Health, tags=["operations"],
             responses={503: {"model": schemas.ErrorBody}})
    async def readyz() -> schemas.Health:
        """200 only when the model, every SAE and the text generator's engine are up and a replica answers."""
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
