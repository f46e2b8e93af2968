"""The ASGI layer in front of the routes: authentication, rate and load limits, body limits, request counting.

It runs before FastAPI reads the body, so an oversized or unauthenticated request costs no
parsing. Probes, metrics and docs (`/healthz`, `/readyz`, `/metrics`, `/docs`, `/openapi.json`)
stay open so Kubernetes and Prometheus need no key; everything under `/v1/` is guarded.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from service.api.errors import error_response, error_type
from service.config import Limits
from service.metrics import REQUESTS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ENDPOINTS = ("/v1/steer", "/v1/chat/completions", "/v1/encode", "/v1/saes", "/v1/models", "/healthz",
             "/readyz", "/metrics")


class RateLimiter:
    """A token bucket per client (API key, or address when auth is off): `per_minute` requests, bursts of it."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.buckets: dict[str, tuple[float, float]] = {}

    MAX_CLIENTS = 10_000

    def allow(self, client: str) -> float | None:
        """None if allowed, else seconds until a token is free."""
        now = time.monotonic()
        if len(self.buckets) >= self.MAX_CLIENTS:
            full_after = self.capacity / self.rate
            self.buckets = {c: (t, last) for c, (t, last) in self.buckets.items() if now - last < full_after}
        tokens, last = self.buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self.buckets[client] = (tokens - 1.0, now)
        return None


class Guard:
    def __init__(self, app: ASGIApp, limits: Limits, api_keys: list[str]) -> None:
        self.app = app
        self.limits = limits
        self.keys = [key.encode() for key in api_keys]
        self.rate = RateLimiter(limits.rate_limit_per_minute) if limits.rate_limit_per_minute else None
        self.in_flight = 0

    @staticmethod
    def _path(scope: Scope) -> str:
        """The path below the app's mount point (Ray Serve's route_prefix arrives as root_path)."""
        root = scope.get("root_path", "").rstrip("/")
        path = scope["path"]
        return (path[len(root):] if root and path.startswith(root) else path) or "/"

    def _authorized(self, headers: dict[bytes, bytes]) -> tuple[bool, str | None]:
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False, None
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token.strip(), key)
        return matched, token.strip().decode(errors="replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = self._path(scope)
        endpoint = path if path in ENDPOINTS else "other"
        status: dict[str, int] = {}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if path.startswith("/v1/"):
                await self._guarded(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            code = status.get("code", 500)
            REQUESTS.labels(endpoint=endpoint, outcome="ok" if code < 400 else error_type(code)).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        client = (scope.get("client") or ("unknown", 0))[0]
        if self.keys:
            ok, token = self._authorized(headers)
            if not ok:
                await error_response(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            client = f"key:{token}"
        if self.rate is not None:
            wait = self.rate.allow(client)
            if wait is not None:
                await error_response(429, "rate limit exceeded; retry later",
                                     headers={"Retry-After": str(max(1, round(wait)))})(scope, receive, send)
                return
        if self.in_flight >= self.limits.max_in_flight:
            await error_response(503, "the server is at capacity; retry later",
                                 headers={"Retry-After": str(self.limits.retry_after_s)})(scope, receive, send)
            return
        if scope["method"] == "POST":
            refusal = self._check_body_headers(headers)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        self.in_flight += 1
        try:
            await self.app(scope, self._bounded(receive), send)
        finally:
            self.in_flight -= 1

    def _check_body_headers(self, headers: dict[bytes, bytes]):
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            shown = content_type.decode(errors="replace") or "none"
            return error_response(415, f"unsupported content type {shown!r}: send application/json")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return error_response(400, "invalid Content-Length header")
            if declared > self.limits.max_body_bytes:
                return error_response(413, f"request body exceeds {self.limits.max_body_bytes} bytes")
        return None

    def _bounded(self, receive: Receive) -> Receive:
        """`receive` that stops a body larger than the limit whatever Content-Length claimed."""
        seen = 0
        limit = self.limits.max_body_bytes

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        return bounded
