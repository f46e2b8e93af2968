"""SAE models, checkpoint formats, activation extraction, training and evaluation (no web code)."""

from sae_modules.formats import CheckpointError, load_sae, save_sae
from sae_modules.saes.base import SAE, SAEConfig

__all__ = ["SAE", "CheckpointError", "SAEConfig", "load_sae", "save_sae"]
