"""The training job's settings: one pydantic model, loadable from YAML, with command-line overrides.

Everything that decides the trained weights lives here, so a checkpoint can record it and a resumed
run can refuse to continue under different settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from sae_modules.saes.base import Architecture


class TrainConfigError(ValueError):
    """A training setting (YAML, flag or shard directory) that cannot work; the message names the field."""


#: Settings a resumed run may change. Paths may move (the data is checked by content instead);
#: a different device, thread count or worker count continues the run but is not bit-identical.
RESUMABLE_CHANGES = frozenset(
    {
        "shards",
        "out",
        "resume",
        "workers",
        "device",
        "threads",
        "progress",
        "verify_shards",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
    }
)


class TrainConfig(BaseModel):
    """One SAE training run. Paths are relative to the working directory."""

    model_config = ConfigDict(extra="forbid")

    shards: Path = Field(description="Activation shard directory (manifest.json + shard-*.safetensors).")
    out: Path = Field(description="Run directory: checkpoints/, train_log.jsonl and the final sae/.")

    architecture: Architecture = "batchtopk"
    n_latents: PositiveInt | None = Field(None, description="Dictionary size; default expansion × d_in.")
    expansion: PositiveFloat = Field(16, description="n_latents = expansion × d_in when n_latents is unset.")
    k: PositiveInt | None = Field(None, description="Active latents per sample (TopK family).")
    group_fractions: list[PositiveFloat] | None = Field(
        None, description="Matryoshka nested group sizes as fractions of n_latents, summing to 1."
    )
    l1_coeff: float | None = Field(None, ge=0, description="ReLU SAE sparsity penalty.")
    auxk_alpha: float | None = Field(None, ge=0)
    auxk_k: PositiveInt | None = None
    dead_window: PositiveInt | None = Field(
        None, description="Samples without firing after which a latent is dead."
    )
    threshold_decay: float | None = Field(None, gt=0, lt=1)
    d_in: PositiveInt | None = Field(
        None, description="Expected activation width; checked against the manifest."
    )

    batch_size: PositiveInt = 4096
    steps: PositiveInt | None = Field(None, description="Optimizer steps; default from `epochs`.")
    epochs: PositiveFloat | None = Field(
        None, description="Passes over the training shards when `steps` is unset."
    )
    lr: PositiveFloat = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(1000, ge=0, description="Linear warm-up from 0 to `lr`.")
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Learning rate at the last step, as a fraction of `lr`."
    )
    grad_clip: PositiveFloat | None = Field(1.0, description="Max gradient norm; null disables clipping.")
    seed: int = 0

    buffer_mb: PositiveFloat = Field(
        1024,
        description="Shuffle buffer: shards mixed together, in MiB of float32 (peak use about twice that).",
    )
    scale_batches: PositiveInt = Field(10, description="Batches used to estimate the input scale.")
    holdout_shards: int = Field(
        1, ge=0, description="Last shards (manifest order) kept for the final evaluation."
    )
    holdout: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Held-out fraction of vectors (taken from the end); overrides holdout_shards.",
    )
    verify_shards: bool = Field(True, description="Check each shard's sha256 the first time it is read.")

    checkpoint_every: PositiveInt = 1000
    keep_checkpoints: PositiveInt = 2
    log_every: PositiveInt = 10
    progress: bool = True
    resume: bool = False
    workers: PositiveInt = Field(1, description="Data-parallel Ray Train workers; 1 trains in this process.")
    device: str = "cpu"
    threads: PositiveInt | None = Field(
        None, description="torch CPU threads for this process (each Ray worker); default: torch's choice."
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set either steps or epochs, not both")
        if self.group_fractions is not None and self.architecture != "matryoshka_batchtopk":
            raise ValueError("group_fractions only applies to architecture matryoshka_batchtopk")
        return self

    def differences(self, other: TrainConfig) -> list[str]:
        """Fields (outside RESUMABLE_CHANGES) whose values differ; a resumed run requires none."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs[k])


def describe_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the field it is about."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"{field}: {e['msg']}")
    return "; ".join(lines)


def load_train_config(path: Path | None = None, **overrides: Any) -> TrainConfig:
    """Read a YAML config (optional) and apply overrides; None-valued overrides mean 'not given'."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise TrainConfigError(f"config: file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise TrainConfigError(f"config: {path} is not valid YAML ({err})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainConfigError(f"config: {path} must hold a mapping of settings")
        values.update(loaded or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise TrainConfigError(describe_validation_error(err)) from None
