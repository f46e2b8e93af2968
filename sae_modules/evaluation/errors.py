"""The one exception every evaluation step raises on bad input, so the CLI can print it cleanly."""

from __future__ import annotations

from sae_modules.errors import VlmSteerError


class EvaluationError(VlmSteerError):
    """Input that cannot be evaluated; `field` names the offending option, file or tensor."""
