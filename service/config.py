"""The service's one settings model: a YAML file (or Ray Serve builder args), then `VLM_STEER_*` env on top.

Models and SAEs are named in a registry here and nowhere else: a request may only pick an id
from it, never a path, so a client cannot make the service read arbitrary files.
Env overrides use `__` for nesting: `VLM_STEER_LIMITS__MAX_TOKENS=128`,
`VLM_STEER_API_KEYS='["k1","k2"]'`, `VLM_STEER_SAES='{"mine": {"path": "/ckpt"}}'`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    IPvAnyNetwork,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from sae_modules.errors import VlmSteerError

log = logging.getLogger(__name__)

CONFIG_ENV = "VLM_STEER_CONFIG"
"""Env var naming the YAML settings file when none is passed explicitly (the container sets it)."""

_file_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("vlm_steer_file", default=None)


class EngineSettings(BaseModel):
    """vLLM's async engine (backend `vllm`): the `AsyncEngineArgs` a GPU server is tuned with.

    Unset fields keep vLLM's defaults; `engine_kwargs` passes any other `AsyncEngineArgs` field."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    max_model_len: PositiveInt | None = Field(None, description="Context length (prompt + image + answer tokens).")
    max_num_seqs: PositiveInt | None = Field(None, description="Sequences vLLM decodes at once (continuous batch).")
    tensor_parallel_size: PositiveInt | None = Field(None, description="GPUs one model is sharded over.")
    enforce_eager: bool | None = Field(None, description="Skip CUDA graphs (faster start, slower decode).")
    dtype: str | None = Field(None, description="vLLM's dtype; None: the model's `dtype` below.")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Further AsyncEngineArgs fields.")

    def engine_args(self) -> dict[str, Any]:
        named = self.model_dump(exclude={"engine_kwargs"}, exclude_none=True)
        return {**self.engine_kwargs, **named}


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field("demo", description="The name clients see in /v1/models and responses.")
    path: str | None = Field(
        None, description="Checkpoint directory or hub id. None: the shipped demo LLaVA (or a random tiny one)."
    )
    backend: Literal["transformers", "vllm"] = "transformers"
    device: str = "cpu"
    dtype: str | None = Field(None, description="torch dtype name, e.g. bfloat16; None keeps the checkpoint's.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine settings.")


class SAEEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="SAE checkpoint directory or hub id.")
    layer: int | None = Field(None, description="Tower block it reads, for checkpoints that do not record it.")


class Limits(BaseModel):
    """Bounds on what one request may ask for; each is enforced with a 4xx before any model work."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: PositiveInt = 16 * 2**20
    max_image_bytes: PositiveInt = 8 * 2**20
    max_image_pixels: PositiveInt = 4096 * 4096
    max_prompt_chars: PositiveInt = 8192
    max_messages: PositiveInt = 32
    max_content_parts: PositiveInt = Field(16, description="Content parts per chat message.")
    max_stop_strings: NonNegativeInt = Field(4, description="Stop strings per chat request (OpenAI allows 4).")
    max_stop_chars: PositiveInt = Field(64, description="Characters per stop string.")
    max_tokens: PositiveInt = 512
    max_interventions: NonNegativeInt = 64
    max_top_k: PositiveInt = 1024
    value_bound: PositiveFloat = 1e4
    request_timeout_s: PositiveFloat = 120.0
    max_in_flight: PositiveInt = Field(
        256, description="Requests one ingress replica works on at once; past it: 503 with Retry-After."
    )
    retry_after_s: PositiveInt = 1
    rate_limit_per_minute: PositiveInt | None = Field(
        None, description="Per API key (per client address when auth is off), per ingress replica; None: off."
    )
    auth_failures_per_minute: PositiveInt | None = Field(
        30, description="401s a client address may cause a minute (per ingress replica); then 429. None: off."
    )
    rate_limit_max_clients: PositiveInt = Field(
        10_000, description="Buckets each limiter keeps; the least recently seen client is forgotten past it."
    )
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Proxies (CIDRs) whose forwarded-for header names the client; empty: the TCP peer.",
    )
    forwarded_for_header: str = Field("x-forwarded-for", description="The header trusted proxies append to.")
    allow_remote_images: bool = Field(False, description="Let chat image_url parts fetch http(s) URLs.")
    remote_image_timeout_s: PositiveFloat = Field(
        10.0, description="One deadline for the whole fetch: DNS, every redirect, the body."
    )
    remote_image_hosts: list[str] = Field(
        default_factory=list, description="Hosts images may come from (`*.example.com`: subdomains); []: any."
    )
    remote_image_max_redirects: NonNegativeInt = 3
    remote_image_ca_file: FilePath | None = Field(
        None, description="PEM CA bundle https image URLs are verified with; None: certifi's public CAs."
    )
    remote_image_allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="UNSAFE: non-public networks images may come from anyway (tests, a trusted intranet).",
    )


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: PositiveInt = 8
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_concurrent_batches: PositiveInt = Field(
        1, description="Steering batches a replica runs at once. 1 suits transformers (one generate at a time: a "
        "request waits behind at most one batch); raise it for vLLM, whose engine batches continuously.")


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: NonNegativeInt = 1
    max_replicas: PositiveInt = 4
    target_ongoing_requests: PositiveFloat = 8


class DeploymentSettings(BaseModel):
    """Replica count or autoscaling, resources and queue bounds of one Ray Serve deployment."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: PositiveInt = 1
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: PositiveInt = 32
    max_queued_requests: int = Field(64, ge=-1, description="Past this the handle raises BackPressureError -> 503.")

    def ray_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        return options


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLM_STEER_", env_nested_delimiter="__", extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings)
    saes: dict[str, SAEEntry] = Field(
        default_factory=dict, description="SAE registry: id -> checkpoint. Empty: the demo SAE as 'demo'."
    )
    default_sae: str | None = Field(None, description="Used when a request names no SAE; None: the first entry.")
    batching: BatchSettings = Field(default_factory=BatchSettings)
    limits: Limits = Field(default_factory=Limits)
    ingress: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(num_cpus=0.5, max_ongoing_requests=512, max_queued_requests=-1)
    )
    steerer: DeploymentSettings = Field(
        default_factory=DeploymentSettings,
        description="The model deployment (SteerGenerate): tower, SAE edit, projector and language model.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens accepted; empty turns authentication off. Env: comma-separated or a JSON list.",
    )
    route_prefix: str = "/"
    app_name: str = "vlm-steer"
    ui_examples_dir: Path | None = Field(
        None, description="Images the /ui playground offers in one click; None: the checkout's examples/ if any."
    )
    report_dir: Path | None = Field(
        None, description="A `vlm-steer evaluate` output (or its browser/ folder): /ui shows each latent's top images."
    )

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        """`model: llava-hf/llava-1.5-7b-hf` means that checkpoint, served under the same name."""
        return {"id": value, "path": value} if isinstance(value, str) else value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [key.strip() for key in text.split(",") if key.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileSource(settings_cls)


class _FileSource(PydanticBaseSettingsSource):
    """The YAML file's values (merged with builder args), ranked below env so operators can override."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return (_file_values.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get() or {})


class ConfigError(VlmSteerError):
    """A settings file that cannot be read or does not fit the settings model."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: str | Path | None = None, values: dict[str, Any] | None = None) -> ServiceSettings:
    """Settings from `path` (default: $VLM_STEER_CONFIG if that file exists), then `values`, then env overrides.

    `values` are what a Ray Serve config's `args:` or the CLI pass; they rank with the file, below env.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
        if not Path(path).is_file():
            log.warning("%s=%s does not exist; using defaults and env overrides", CONFIG_ENV, path)
            path = None
    data = _deep_merge(read_yaml(path) if path else {}, values or {})
    token = _file_values.set(data)
    try:
        return ServiceSettings()
    finally:
        _file_values.reset(token)
