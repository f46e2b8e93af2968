"""The one error every checkpoint reader and writer raises, so callers catch a single type."""

from __future__ import annotations

from sae_modules.errors import VlmSteerError


class CheckpointError(VlmSteerError):
    """A checkpoint that cannot be read or written; the message says which file and what is wrong."""
