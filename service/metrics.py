"""Prometheus metrics of the steering service, recorded in the ingress replica and served at /metrics.

Every Ray replica is its own process with its own registry, so nothing is recorded inside the
model replicas: they return their stage timings (named by `Stage`, the engine's one list of
stages) and batch sizes with each result, and the ingress observes them here. Labels carry only bounded values (endpoint, outcome, stage,
SAE id): never a latent, a request id or a user.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from service.engine.types import Stage

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "steer_requests", "Requests answered, by endpoint and outcome (ok or the error type).",
    ["endpoint", "outcome"], registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "steer_stage_seconds", "Seconds spent per stage of one request (stages: service.engine.types.Stage).", ["stage"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram(
    "steer_batch_size", "Images per steerer batch (one observation per batch).", registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
INTERVENTIONS = Histogram(
    "steer_interventions", "Interventions per steering request.", registry=REGISTRY,
    buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128),
)
SAE_FVU = Histogram(
    "steer_sae_fvu", "Fraction of variance unexplained by the SAE on request images.", registry=REGISTRY,
    buckets=(0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2),
)
SAE_L0 = Histogram(
    "steer_sae_l0", "Active SAE latents per token on request images.", registry=REGISTRY,
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
FIRST_TOKEN = Histogram(
    "steer_time_to_first_token_seconds", "Seconds from a streamed request's arrival to its first text.",
    ["endpoint"], registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SAE_INFO = Gauge(
    "steer_sae_info", "SAEs loaded by the service (value 1).", ["sae", "layer", "n_latents"], registry=REGISTRY,
)


def observe_stages(timings_s: dict[Stage, float]) -> None:
    for stage, seconds in timings_s.items():
        STAGE_SECONDS.labels(stage=Stage(stage).value).observe(seconds)


def observe_sae(l0: float | None, fvu: float | None) -> None:
    if l0 is not None:
        SAE_L0.observe(l0)
    if fvu is not None:
        SAE_FVU.observe(fvu)


def exposition() -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
