"""The ASGI layer in front of the routes: authentication, rate and load limits, body limits, request counting.

It runs before FastAPI reads the body, so an oversized or unauthenticated request costs no
parsing. Probes, metrics and docs (`/healthz`, `/readyz`, `/metrics`, `/docs`, `/openapi.json`)
stay open so Kubernetes and Prometheus need no key; everything under `/v1/` is guarded.

Who a client is: its API key when keys are configured (so everyone behind one proxy does not share
a bucket), else its address. The address is the TCP peer, or, when that peer is a configured
trusted proxy, the rightmost forwarded-for entry that is not a trusted proxy itself (entries to
its left are whatever the client wrote). Failed authentication is limited per address, before
the key is even compared, so guessing keys is as slow for a right guess as for a wrong one. All
limits live in this process: they are per ingress replica.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import time
from collections import OrderedDict
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
    """A token bucket per client: `per_minute` tokens a minute, bursts of as many.

    At most `max_clients` buckets are kept: past that the least recently seen client is
    forgotten (it starts again with a full bucket), so a flood of new identities costs bounded memory."""

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self.max_clients = max_clients
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, client: str, now: float) -> float:
        tokens, last = self.buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - last) * self.rate)

    def wait(self, client: str) -> float | None:
        """None if `client` has a token now, else seconds until it has one (takes nothing)."""
        tokens = self._tokens(client, time.monotonic())
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def allow(self, client: str) -> float | None:
        """Take a token: None if there was one, else seconds until there is."""
        now = time.monotonic()
        tokens = self._tokens(client, now)
        taken = tokens >= 1.0
        self.buckets[client] = (tokens - 1.0 if taken else tokens, now)
        self.buckets.move_to_end(client)
        while len(self.buckets) > self.max_clients:
            self.buckets.popitem(last=False)
        return None if taken else (1.0 - tokens) / self.rate


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def client_address(scope: Scope, limits: Limits) -> str:
    """The client's address: the TCP peer, or what trusted proxies say in `limits.forwarded_for_header`."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    trusted = limits.trusted_proxies

    def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip in network for network in trusted)

    if not is_trusted(_ip(peer)):
        return peer
    name = limits.forwarded_for_header.lower().encode()
    hops = [hop.strip() for value in (v for k, v in scope["headers"] if k == name)
            for hop in value.decode("latin-1").split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(_ip(hop)):
            return hop
    return hops[0] if hops else peer


class Guard:
    """Wraps the FastAPI app; one instance per ingress replica, so its limits are per replica."""

    def __init__(self, app: ASGIApp, limits: Limits, api_keys: list[str]) -> None:
        self.app = app
        self.limits = limits
        self.keys = [key.encode() for key in api_keys]
        per_minute, clients = limits.rate_limit_per_minute, limits.rate_limit_max_clients
        self.rate = RateLimiter(per_minute, clients) if per_minute else None
        failures = limits.auth_failures_per_minute
        self.auth_failures = RateLimiter(failures, clients) if failures and self.keys else None
        self.in_flight = 0

    @staticmethod
    def _path(scope: Scope) -> str:
        """The path below the app's mount point (Ray Serve's route_prefix arrives as root_path)."""
        root = scope.get("root_path", "").rstrip("/")
        path = scope["path"]
        return (path[len(root):] if root and path.startswith(root) else path) or "/"

    def _key_index(self, headers: dict[bytes, bytes]) -> int | None:
        """Which configured key the bearer token is (compared with every key, in constant time each)."""
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None
        matched = None
        for index, key in enumerate(self.keys):
            if hmac.compare_digest(token.strip(), key):
                matched = index
        return matched

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
        address = client_address(scope, self.limits)
        client = f"address:{address}"
        if self.keys:
            if self.auth_failures is not None and (wait := self.auth_failures.wait(address)) is not None:
                await self._too_many("too many failed authentication attempts; retry later", wait)(
                    scope, receive, send)
                return
            key = self._key_index(headers)
            if key is None:
                if self.auth_failures is not None:
                    self.auth_failures.allow(address)
                await error_response(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            client = f"key:{key}"
        if self.rate is not None and (wait := self.rate.allow(client)) is not None:
            await self._too_many("rate limit exceeded; retry later", wait)(scope, receive, send)
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

    @staticmethod
    def _too_many(message: str, wait: float) -> ASGIApp:
        return error_response(429, message, headers={"Retry-After": str(max(1, math.ceil(wait)))})

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
