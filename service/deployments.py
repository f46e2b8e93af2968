"""Ray Serve deployments and `build_app`, the one application builder every entry point uses.

`vlm-steer serve`, `serve run deploy/serve_config.yaml` (`import_path: service.deployments:build_app`)
and a KubeRay RayService all call `build_app(args)`. Two layouts, chosen by `layout` in the config:

- `colocated` (default): ingress -> `SteerGenerate`, one replica that steers and generates a batch;
  image embeddings never leave the device.
- `split`: ingress -> `Steerer` (batched tower + SAE + projector) -> ingress -> `Generator`
  (batched language model); the two scale and take resources separately.

Replicas hold no request logic: batches go to the plain functions in `service.pipeline`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from service.api.errors import APIError
from service.api.routes import create_app
from service.assets import resolve_checkpoints
from service.config import ServiceSettings, load_settings
from service.engine.types import GenerationOutput, GenerationRequest
from service.pipeline import (
    EmbedResult,
    EncodeJob,
    EncodeResult,
    ServingInfo,
    SteerJob,
    SteerResult,
    encode_batch,
    generate_batch,
    generation_requests,
    serving_info,
    steer_batch,
    steer_generate_batch,
)


def load_engine(settings: ServiceSettings):
    """The engine for the registry's model and SAEs (or the demo pair), with the config's layer overrides."""
    from service.engine.engine import SteeringEngine

    checkpoints = resolve_checkpoints(settings)
    layers = {"sae_layers": checkpoints.layers} if checkpoints.layers else {}
    return SteeringEngine.load(checkpoints.model, checkpoints.saes, checkpoints.default_sae,
                               backend=settings.model.backend, device=settings.model.device,
                               dtype=settings.model.dtype, value_bound=settings.limits.value_bound, **layers)


class _ModelReplica:
    """What every model-holding replica offers: its serving info, readiness and batched encodes."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.engine = load_engine(settings)
        self._info = serving_info(self.engine, settings.model.id)
        for method in self._batched():
            method.set_max_batch_size(settings.batching.max_batch_size)
            method.set_batch_wait_timeout_s(settings.batching.batch_wait_timeout_s)

    def _batched(self) -> list[Any]:
        return [self.encode]

    def info(self) -> ServingInfo:
        return self._info

    def ready(self) -> bool:
        return True

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, jobs: list[EncodeJob]) -> list[EncodeResult]:
        return await asyncio.to_thread(encode_batch, self.engine, jobs)


@serve.deployment(name="SteerGenerate")
class SteerGenerate(_ModelReplica):
    """Colocated layout: steer and generate each batch in this replica."""

    def _batched(self) -> list[Any]:
        return [self.encode, self.steer]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def steer(self, jobs: list[SteerJob]) -> list[SteerResult]:
        return await asyncio.to_thread(steer_generate_batch, self.engine, jobs)


def _to_cpu(results: list[EmbedResult]) -> list[EmbedResult]:
    for result in results:
        embeds = result.embeds
        embeds.steered = None if embeds.steered is None else embeds.steered.cpu()
        embeds.default = None if embeds.default is None else embeds.default.cpu()
    return results


@serve.deployment(name="Steerer")
class Steerer(_ModelReplica):
    """Split layout: batched tower, SAE edit and projector; embeddings go back to the ingress on CPU."""

    def _batched(self) -> list[Any]:
        return [self.encode, self.steer]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def steer(self, jobs: list[SteerJob]) -> list[EmbedResult]:
        return _to_cpu(await asyncio.to_thread(steer_batch, self.engine, jobs))


@serve.deployment(name="Generator")
class Generator(_ModelReplica):
    """Split layout: batched generation from image embeddings."""

    def _batched(self) -> list[Any]:
        return [self.encode, self.generate]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return await asyncio.to_thread(generate_batch, self.engine, requests)


async def _call(response: Any, retry_after_s: int) -> Any:
    """Await a handle call, turning Ray's overload and replica failures into 503 JSON errors."""
    try:
        return await response
    except BackPressureError as exc:
        raise APIError(503, "the server is overloaded; retry later",
                       headers={"Retry-After": str(retry_after_s)}) from exc
    except (DeploymentUnavailableError, RayActorError) as exc:
        raise APIError(503, f"a model replica is unavailable: {type(exc).__name__}",
                       headers={"Retry-After": str(retry_after_s)}) from exc


class HandleBackend:
    """The routes' `Backend` over Ray handles; `generator` None means the colocated layout."""

    def __init__(self, model: DeploymentHandle, generator: DeploymentHandle | None, retry_after_s: int) -> None:
        self.model = model
        self.generator = generator
        self.retry_after_s = retry_after_s
        self._info: ServingInfo | None = None

    async def info(self) -> ServingInfo:
        if self._info is None:
            self._info = await _call(self.model.info.remote(), self.retry_after_s)
        return self._info

    async def ready(self) -> bool:
        handles = [self.model] if self.generator is None else [self.model, self.generator]
        answers = await asyncio.gather(*(_call(h.ready.remote(), self.retry_after_s) for h in handles))
        return all(answers)

    async def encode(self, job: EncodeJob) -> EncodeResult:
        return await _call(self.model.encode.remote(job), self.retry_after_s)

    async def steer(self, job: SteerJob) -> SteerResult:
        if self.generator is None:
            return await _call(self.model.steer.remote(job), self.retry_after_s)
        embedded: EmbedResult = await _call(self.model.steer.remote(job), self.retry_after_s)
        requests = generation_requests(job, embedded.embeds)
        outputs = await asyncio.gather(
            *(_call(self.generator.generate.remote(request), self.retry_after_s) for request in requests.values())
        )
        timings = dict(embedded.embeds.timings_s)
        timings["generate"] = max(output.seconds for output in outputs)
        return SteerResult(dict(zip(requests, outputs)), embedded.embeds.stats, timings, embedded.slot)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP entry: FastAPI routes, auth and limits; model work goes to the model deployments."""

    def __init__(self, settings: ServiceSettings, model: DeploymentHandle,
                 generator: DeploymentHandle | None = None) -> None:
        self.settings = settings
        self.backend = HandleBackend(model, generator, settings.limits.retry_after_s)

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, self.backend)


def build_app(args: dict[str, Any] | ServiceSettings) -> serve.Application:
    """The Ray Serve application for `args`: a ServiceSettings, or builder args (`config_file` + overrides)."""
    if isinstance(args, ServiceSettings):
        settings = args
    else:
        values = dict(args)
        settings = load_settings(values.pop("config_file", None), values)
    if settings.layout == "colocated":
        model = SteerGenerate.options(**settings.steerer.ray_options()).bind(settings)
        return Ingress.options(**settings.ingress.ray_options()).bind(settings, model)
    steerer = Steerer.options(**settings.steerer.ray_options()).bind(settings)
    generator = Generator.options(**settings.generator.ray_options()).bind(settings)
    return Ingress.options(**settings.ingress.ray_options()).bind(settings, steerer, generator)
