"""One base for every error that a user's input can cause, so each front end maps it in one place.

A library error names the offending *field* (a config key, a request field, a file's role), never a
command-line flag: the HTTP layer turns `kind` into a status (`service.api.errors.HTTP_STATUS`), and
the CLIs turn it into an exit code and the field into their flag (`sae_modules.cli_errors`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class ErrorKind(StrEnum):
    INVALID = "invalid"
    """The input breaks a rule (a shape, a range, a format)."""
    NOT_FOUND = "not_found"
    """The input names something that does not exist (an SAE id, a file, a checkpoint)."""
    UNAVAILABLE = "unavailable"
    """The input is fine but something it needs cannot be had now (a model that fails to load)."""


class VlmSteerError(ValueError):
    """Input that vlm-steer cannot use; the message says why, `field` (when known) says where."""

    kind: ClassVar[ErrorKind] = ErrorKind.INVALID

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
