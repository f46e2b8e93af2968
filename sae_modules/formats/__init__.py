"""Checkpoint formats: ours (native), EleutherAI sparsify, SAELens, and dictionary_learning (the paper's)."""

from sae_modules.formats.detect import detect_format, load_sae, resolve_checkpoint
from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.native import save_sae
from sae_modules.formats.saelens import export_saelens
from sae_modules.formats.sparsify import export_sparsify

__all__ = [
    "CheckpointError",
    "detect_format",
    "export_saelens",
    "export_sparsify",
    "load_sae",
    "resolve_checkpoint",
    "save_sae",
]
