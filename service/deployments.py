"""Ray Serve deployments and `build_app`, the one application builder every entry point uses.

`vlm-steer serve`, `serve run deploy/serve_config.yaml` (`import_path: service.deployments:build_app`)
and a KubeRay RayService all call `build_app(args)`: a thin `Ingress` (FastAPI: auth, limits, every
check a request can fail) in front of one `SteerGenerate` deployment (the model) whose replicas hold the engine.

A replica gathers concurrent jobs into batches (`@serve.batch`) and runs each batch through
`SteeringEngine.steer` in a worker thread. Every job, streamed or not, has its own queue of events
(text deltas, then its result or error), filled as the engine makes them: a job is answered the
moment its own last token is made, and a job whose caller went away is cancelled between tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from service.api.errors import APIError
from service.api.routes import create_app
from service.assets import resolve_checkpoints
from service.config import ServiceSettings, load_settings
from service.engine.types import (
    EncodeJob,
    EncodeResult,
    JobError,
    OutputType,
    ServingInfo,
    SteerJob,
    SteerResult,
    StreamEvent,
    TextDelta,
)

log = logging.getLogger(__name__)


def load_engine(settings: ServiceSettings):
    """The engine for the registry's model and SAEs (or the demo pair), with the config's layer overrides."""
    from service.engine.engine import SteeringEngine

    checkpoints = resolve_checkpoints(settings)
    model = settings.model
    return SteeringEngine.load(checkpoints.model, checkpoints.saes, checkpoints.default_sae, backend=model.backend,
                               device=model.device, dtype=model.dtype, value_bound=settings.limits.value_bound,
                               sae_layers=checkpoints.layers or None, engine_args=model.engine.engine_args())


@dataclass
class _Ticket:
    """One job inside a replica: its events queue and whether its caller is gone."""

    job: SteerJob
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def put(self, event: StreamEvent) -> None:
        """Thread-safe: the engine calls this from its worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _TicketListener:
    """The engine's `JobListener` for one batch of tickets."""

    def __init__(self, tickets: list[_Ticket]) -> None:
        self.tickets = tickets

    def streams(self, job: int) -> bool:
        return self.tickets[job].stream

    def delta(self, job: int, kind: OutputType, text: str) -> None:
        self.tickets[job].put(TextDelta(kind, text))

    def done(self, job: int, outcome: SteerResult | JobError) -> None:
        self.tickets[job].put(outcome)

    def cancelled(self, job: int) -> bool:
        return self.tickets[job].cancelled


@serve.deployment(name="SteerGenerate")
class SteerGenerate:
    """A model replica: the engine, batched steering (streamed or not) and batched encodes."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.engine = load_engine(settings)
        self._info = self.engine.info(settings.model.id)
        batching = settings.batching
        self._steer_batch = serve.batch(self._run_steer, max_batch_size=batching.max_batch_size,
                                        batch_wait_timeout_s=batching.batch_wait_timeout_s,
                                        max_concurrent_batches=batching.max_concurrent_batches)
        self._encode_batch = serve.batch(self._run_encode, max_batch_size=batching.max_batch_size,
                                         batch_wait_timeout_s=batching.batch_wait_timeout_s)
        self._running: set[asyncio.Task] = set()

    def info(self) -> ServingInfo:
        return self._info

    def ready(self) -> bool:
        return self.engine.healthy()

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising marks the replica unhealthy, and Serve replaces it."""
        if not self.engine.healthy():
            raise RuntimeError("the text generator's engine is dead")

    async def steer(self, job: SteerJob) -> SteerResult | JobError:
        """The job's result (or error), as soon as its own answers are complete."""
        async for event in self._events(job, stream=False):
            if not isinstance(event, TextDelta):
                return event
        raise RuntimeError("a steering job ended without an outcome")

    async def steer_stream(self, job: SteerJob) -> AsyncIterator[StreamEvent]:
        """Text deltas as tokens are made, then the result or error (call with `handle.options(stream=True)`)."""
        async for event in self._events(job, stream=True):
            yield event

    async def encode(self, job: EncodeJob) -> EncodeResult | JobError:
        return await self._encode_batch(job)

    async def _events(self, job: SteerJob, stream: bool) -> AsyncIterator[StreamEvent]:
        ticket = _Ticket(job, stream, asyncio.get_running_loop())
        task = asyncio.ensure_future(self._steer_batch(ticket))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            while True:
                event = await ticket.events.get()
                yield event
                if not isinstance(event, TextDelta):
                    return
        finally:
            ticket.cancelled = True  # done, or the caller went away: either way its row may stop

    async def _run_steer(self, tickets: list[_Ticket]) -> list[None]:
        await asyncio.to_thread(self.engine.steer, [t.job for t in tickets], _TicketListener(tickets))
        return [None] * len(tickets)

    async def _run_encode(self, jobs: list[EncodeJob]) -> list[EncodeResult | JobError]:
        return await asyncio.to_thread(self.engine.encode, jobs)


def _unavailable(exc: Exception, retry_after_s: int) -> APIError:
    """Ray's overload and replica failures as 503 JSON errors."""
    if isinstance(exc, BackPressureError):
        return APIError(503, "the server is overloaded; retry later", headers={"Retry-After": str(retry_after_s)})
    return APIError(503, f"a model replica is unavailable: {type(exc).__name__}",
                    headers={"Retry-After": str(retry_after_s)})


_RAY_FAILURES = (BackPressureError, DeploymentUnavailableError, RayActorError)


class HandleBackend:
    """The routes' `Backend` over the model deployment's handle."""

    def __init__(self, model: DeploymentHandle, retry_after_s: int) -> None:
        self.model = model
        self.retry_after_s = retry_after_s
        self._info: ServingInfo | None = None

    async def _call(self, response: Any) -> Any:
        try:
            return await response
        except _RAY_FAILURES as exc:
            raise _unavailable(exc, self.retry_after_s) from exc

    async def info(self) -> ServingInfo:
        if self._info is None:
            self._info = await self._call(self.model.info.remote())
        return self._info

    async def ready(self) -> bool:
        return await self._call(self.model.ready.remote())

    async def steer(self, job: SteerJob) -> SteerResult | JobError:
        return await self._call(self.model.steer.remote(job))

    async def steer_stream(self, job: SteerJob) -> AsyncIterator[StreamEvent]:
        events = self.model.options(stream=True).steer_stream.remote(job)
        try:
            async for event in events:
                yield event
        except _RAY_FAILURES as exc:
            raise _unavailable(exc, self.retry_after_s) from exc
        finally:
            events.cancel()  # a client that left frees its row in the replica

    async def encode(self, job: EncodeJob) -> EncodeResult | JobError:
        return await self._call(self.model.encode.remote(job))


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP entry: FastAPI routes, auth and limits; model work goes to the model deployment."""

    def __init__(self, settings: ServiceSettings, model: DeploymentHandle) -> None:
        self.settings = settings
        self.backend = HandleBackend(model, settings.limits.retry_after_s)

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, self.backend)


def build_app(args: dict[str, Any] | ServiceSettings) -> serve.Application:
    """The Ray Serve application for `args`: a ServiceSettings, or builder args (`config_file` + overrides)."""
    if isinstance(args, ServiceSettings):
        settings = args
    else:
        values = dict(args)
        settings = load_settings(values.pop("config_file", None), values)
    model = SteerGenerate.options(**settings.steerer.ray_options()).bind(settings)
    return Ingress.options(**settings.ingress.ray_options()).bind(settings, model)
