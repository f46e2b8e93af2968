"""Checkpoint formats: ours (native), SAELens, and dictionary_learning (the paper's releases)."""

from sae_modules.formats.detect import detect_format, load_sae, resolve_checkpoint
from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.native import save_sae
from sae_modules.formats.saelens import export_saelens

__all__ = ["CheckpointError", "detect_format", "export_saelens", "load_sae", "resolve_checkpoint", "save_sae"]
