"""`train_sae`: the one call that trains an SAE, in this process or data-parallel on Ray."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sae_modules.train.config import TrainConfig
from sae_modules.train.trainer import StepRecord, plan_run, run_training


def train_sae(config: TrainConfig, on_step: Callable[[StepRecord], None] | None = None) -> Path:
    """Train (or, with config.resume, continue) an SAE; returns the final SAE checkpoint directory.

    `on_step` sees every logged step (in-process runs only; Ray workers log to the JSONL file).
    """
    if config.workers > 1:
        plan_run(config)
        from sae_modules.train.ray_train import train_with_ray

        final = train_with_ray(config)
    else:
        final = run_training(config, on_step=on_step)
    if config.latent_stats:
        from sae_modules.evaluation.dictionary import write_dictionary

        write_dictionary(final, config.shards, device=config.device)
    return final
