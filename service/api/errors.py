"""OpenAI-style error bodies, `{"error": {"type", "message", "param"}}`, for every failure the API can have.

Bad input must never surface as a 500 with a traceback: request validation, engine-side spec
checks, backpressure and timeouts each map to their own status here, in one place.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sae_modules.errors import VlmSteerError
from service.error_status import http_status

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class APIError(Exception):
    """An error the client should see as-is: status, OpenAI error type, message, offending field."""

    def __init__(
        self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return error_type(self.status)


def error_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status."""
    return _TYPES.get(status, "api_error")


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"type": error_type(status), "message": message, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """`("body", "interventions", 0, "latent")` -> `interventions.0.latent` (the request-body path)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    where = field_path(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def _leaf_field(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's union-branch tags (e.g. `literal['all','cls','patches']`) from a location."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [dict(e, loc=_leaf_field(tuple(e.get("loc", ())))) for e in exc.errors()]
        first = errors[0] if errors else {"type": "missing", "loc": (), "msg": "invalid request"}
        if first["type"] == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        if first["loc"] == ("body",):
            return error_response(400, f"the request body must be a JSON object: {first['msg']}")
        return error_response(422, _validation_message(errors), field_path(first["loc"]) or None)

    @app.exception_handler(VlmSteerError)
    async def _library(_: Request, exc: VlmSteerError) -> JSONResponse:
        return error_response(http_status(exc), str(exc), exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return error_response(500, f"internal error: {type(exc).__name__}")
