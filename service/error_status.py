"""The one mapping from an error's kind to the HTTP status a client gets, for the routes and the engine alike."""

from __future__ import annotations

from sae_modules.errors import ErrorKind, VlmSteerError

HTTP_STATUS = {ErrorKind.INVALID: 422, ErrorKind.NOT_FOUND: 404, ErrorKind.UNAVAILABLE: 503}


def http_status(err: VlmSteerError) -> int:
    return HTTP_STATUS[err.kind]


def kind_of_status(status: int) -> ErrorKind:
    """The kind behind a status that crossed a process boundary as a number (a per-job error)."""
    if status >= 500:
        return ErrorKind.UNAVAILABLE
    return ErrorKind.NOT_FOUND if status == 404 else ErrorKind.INVALID
