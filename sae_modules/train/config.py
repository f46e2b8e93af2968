"""The training job's settings: one pydantic model, loadable from YAML, with command-line overrides.

Everything that decides the trained weights lives here, so a checkpoint can record it and a resumed
run can refuse to continue under different settings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from sae_modules.errors import VlmSteerError
from sae_modules.saes.base import INFERENCE_ONLY, Architecture, SAESettings


class TrainConfigError(VlmSteerError):
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
        "latent_stats",
        "max_worker_failures",
    }
)


#: Named recipes: defaults filled in for the settings a config leaves out. `paper` is the recipe of
#: the paper's scripts (dictionary_learning's BatchTopK/Matryoshka trainers); `signum` is ours:
#: the same SAE and loss with sparsify's optimizer (sign-SGD, schedule-free momentum 0.95), which
#: needs no warm-up or decay and moves faster per step.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"optimizer": "adam", "warmup_steps": 1000, "decay": "linear"},
    "signum": {"optimizer": "signum", "warmup_steps": 0, "decay": "constant"},
}

#: Peak learning rate at 2^14 latents; the default scales it by 1 / sqrt(n_latents / 2^14)
#: (the reference trainers' width scaling: Adam 2e-4 as dictionary_learning, signum 5e-3 as sparsify).
BASE_LR = {"adam": 2e-4, "signum": 5e-3}


class SAESection(SAESettings):
    """The `sae:` section of a run: the SAE's settings, its size given relative to the activations.

    Its fields may also be written at the top level of a config (as their command-line flags are).
    """

    architecture: Architecture = "batchtopk"
    n_latents: PositiveInt | None = Field(None, description="Dictionary size; default expansion × d_in.")
    expansion: PositiveFloat = Field(16, description="n_latents = expansion × d_in when n_latents is unset.")
    group_fractions: list[PositiveFloat] | None = Field(
        None, description="Matryoshka nested group sizes as fractions of n_latents, summing to 1."
    )

    @field_validator("architecture")
    @classmethod
    def _trainable(cls, architecture: str) -> str:
        if architecture in INFERENCE_ONLY:
            trainable = ", ".join(a for a in get_args(Architecture) if a not in INFERENCE_ONLY)
            raise ValueError(
                f"{architecture!r} is inference-only (it loads foreign checkpoints); train one of {trainable}"
            )
        return architecture

    @model_validator(mode="after")
    def _check(self) -> SAESection:
        if self.group_fractions is not None and self.architecture != "matryoshka_batchtopk":
            raise ValueError("group_fractions only applies to architecture matryoshka_batchtopk")
        return self


class TrainConfig(BaseModel):
    """One SAE training run. Paths are relative to the working directory."""

    model_config = ConfigDict(extra="forbid")

    shards: Path = Field(description="Activation shard directory (manifest.json + shard-*.safetensors).")
    out: Path = Field(description="Run directory: checkpoints/, train_log.jsonl and the final sae/.")
    sae: SAESection = Field(default_factory=SAESection)
    d_in: PositiveInt | None = Field(
        None, description="Expected activation width; checked against the manifest."
    )

    recipe: Literal["paper", "signum"] = Field(
        "paper", description="Defaults for optimizer, warmup_steps and decay: paper (Adam) or signum."
    )
    optimizer: Literal["adam", "signum"] = Field(
        None, description="adam, or signum (sign-SGD under sparsify's schedule-free wrapper)."
    )  # type: ignore[assignment]  # always filled by the recipe
    batch_size: PositiveInt = 4096
    steps: PositiveInt | None = Field(None, description="Optimizer steps; default from `epochs`.")
    epochs: PositiveFloat | None = Field(
        None, description="Passes over the training shards when `steps` is unset."
    )
    lr: PositiveFloat | None = Field(
        None, description="Peak learning rate; default BASE_LR[optimizer] / sqrt(n_latents / 2^14)."
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam's betas.")
    momentum: float = Field(0.95, gt=0, lt=1, description="signum: schedule-free momentum.")
    warmup_steps: NonNegativeInt = Field(  # type: ignore[assignment]  # always filled by the recipe
        None, description="Linear warm-up from 0 to `lr`."
    )
    decay: Literal["linear", "cosine", "constant"] = Field(
        None, description="After warm-up: linear (constant, then down over decay_steps), cosine or constant."
    )  # type: ignore[assignment]
    decay_steps: PositiveInt = Field(
        1, description="linear: the last steps, over which the LR falls to min_lr_ratio × lr (scripts: 1)."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Learning rate at the end of the decay, as a fraction of `lr`."
    )
    grad_clip: PositiveFloat | None = Field(1.0, description="Max gradient norm; null disables clipping.")
    threshold_start_step: NonNegativeInt = Field(
        1000, description="BatchTopK θ is learned only after this step (its first value set outright)."
    )
    b_dec_init: Literal["geometric_median", "zeros"] = Field(
        "geometric_median", description="b_dec at step 0: the first batch's geometric median, or zeros."
    )
    seed: int = 0
    max_worker_failures: int = Field(
        3, ge=-1, description="Ray Train: times a failed or preempted worker group restarts from the last "
        "checkpoint (-1: without end)."
    )
    latent_stats: bool = Field(
        True, description="Write the final SAE's latent statistics (as `vlm-steer evaluate stats`) beside it, "
        "computed over the training shards."
    )

    buffer_mb: PositiveFloat = Field(
        1024,
        description="Shuffle buffer: shards mixed together, in MiB of float32 (peak use about twice that).",
    )
    scale_batches: PositiveInt = Field(10, description="Batches used to estimate the input scale.")
    holdout_shards: NonNegativeInt = Field(
        1, description="Last shards (manifest order) kept for the final evaluation."
    )
    holdout: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Held-out fraction of vectors (taken from the end); overrides holdout_shards.",
    )
    verify_shards: bool = Field(True, description="Check each shard's sha256 the first time it is read.")

    checkpoint_every: PositiveInt = Field(1000, description="Steps between checkpoints.")
    keep_checkpoints: PositiveInt = Field(2, description="Checkpoints kept on disk.")
    log_every: PositiveInt = Field(10, description="Steps between log lines.")
    progress: bool = Field(True, description="Show a progress bar.")
    resume: bool = Field(False, description="Continue from the last checkpoint.")
    workers: PositiveInt = Field(1, description="Data-parallel Ray Train workers; 1 trains in this process.")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ...")
    threads: PositiveInt | None = Field(
        None, description="torch CPU threads for this process (each Ray worker); default: torch's choice."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        """Move top-level SAE settings into `sae`, then fill what is unset from the recipe."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        sae_keys = [k for k in data if k in SAESection.model_fields and k not in cls.model_fields]
        if sae_keys:
            section = data.get("sae") or {}
            section = section.model_dump(exclude_unset=True) if isinstance(section, BaseModel) else section
            data["sae"] = {**section, **{k: data.pop(k) for k in sae_keys}}
        recipe = RECIPES.get(data.get("recipe", "paper"), {})
        return {**recipe, **{k: v for k, v in data.items() if v is not None or k not in recipe}}

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set either steps or epochs, not both")
        if self.optimizer == "signum" and self.warmup_steps > 0:
            raise ValueError(
                "warmup_steps: signum's schedule-free averaging takes no warm-up "
                "(a first step at lr 0 has no weight); use recipe signum or warmup_steps 0"
            )
        return self

    def peak_lr(self, n_latents: int) -> float:
        """`lr`, or the optimizer's default scaled to the dictionary size."""
        return self.lr or BASE_LR[self.optimizer] / math.sqrt(n_latents / 2**14)

    def differences(self, other: TrainConfig) -> list[str]:
        """Settings (outside RESUMABLE_CHANGES) whose values differ; a resumed run requires none."""
        mine, theirs = _flat(self.model_dump(mode="json")), _flat(other.model_dump(mode="json"))
        return sorted(
            k
            for k in mine.keys() | theirs.keys()
            if k not in RESUMABLE_CHANGES and mine.get(k) != theirs.get(k)
        )


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sae': {'k': 2}} -> {'sae.k': 2}: differences name the setting itself."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
