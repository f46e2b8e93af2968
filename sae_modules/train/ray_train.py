"""Data-parallel training with Ray Train: N torch.distributed workers (gloo on CPU, nccl on GPU).

Each worker runs the same `run_training` loop; Ray only places the workers and sets up the
process group. Checkpoints stay in the run directory (shared storage on a cluster), so `--resume`
works the same with or without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchTrainer

from sae_modules.train.config import TrainConfig
from sae_modules.train.trainer import FINAL_SAE, run_training


class RayTrainingError(RuntimeError):
    """A Ray Train worker failed; the message carries the worker's error."""


def _worker(loop_config: dict[str, Any]) -> None:
    run_training(TrainConfig.model_validate(loop_config["config"]))


def train_with_ray(config: TrainConfig) -> Path:
    """Run `config.workers` workers on the current Ray cluster (a local one is started if none)."""
    if not ray.is_initialized():
        ray.init()
    out = config.out.resolve()
    worker_config = config.model_copy(
        update={"shards": config.shards.resolve(), "out": out, "progress": False}
    )
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": worker_config.model_dump(mode="json")},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.device.startswith("cuda")),
        run_config=RunConfig(name="vlm-steer-train", storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=config.max_worker_failures)),
    )
    try:
        trainer.fit()
    except TrainingFailedError as err:
        raise RayTrainingError(f"Ray Train run failed: {err}") from None
    return out / FINAL_SAE
