"""The one exception every evaluation step raises on bad input, so the CLI can print it cleanly."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Input that cannot be evaluated; `field` names the offending option, file or tensor."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field
