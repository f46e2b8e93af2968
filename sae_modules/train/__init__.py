"""SAE training on activation shards: `train_sae(config)` in Python, `vlm-steer train` on the command line."""

from sae_modules.train.api import train_sae
from sae_modules.train.config import TrainConfig, TrainConfigError, load_train_config

__all__ = ["TrainConfig", "TrainConfigError", "load_train_config", "train_sae"]
