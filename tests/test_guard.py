"""The Guard ASGI layer served by a real uvicorn on 127.0.0.1 and called with a real HTTP client.

The app behind it is a small ASGI app that answers after a set delay, so the in-flight limit can
be reached on purpose; the model side is not needed to test who gets in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from service.api.guard import Guard, RateLimiter, client_address
from service.config import Limits
from tests.ray_app import free_port

KEYS = ["key-a", "key-b"]


async def slow_app(scope, receive, send) -> None:
    """200 after `?delay=` seconds (default 0), echoing nothing: the guard is what is tested."""
    if scope["type"] != "http":
        return
    query = dict(part.split("=") for part in scope["query_string"].decode().split("&") if "=" in part)
    await asyncio.sleep(float(query.get("delay", 0)))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


@contextmanager
def guarded(limits: Limits, keys: list[str]) -> Iterator[str]:
    """uvicorn serving Guard(slow_app) on a free 127.0.0.1 port, in a thread; stopped afterwards.

    uvicorn's own X-Forwarded-For handling is off, so the forwarded-for logic tested is the guard's."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Guard(slow_app, limits, keys), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off", proxy_headers=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_rate_limit_is_per_api_key_not_per_address() -> None:
    with guarded(Limits(rate_limit_per_minute=3), KEYS) as base, httpx.Client(base_url=base) as client:
        statuses = [client.get("/v1/models", headers=bearer("key-a")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        refused = client.get("/v1/models", headers=bearer("key-a"))
        assert refused.json()["error"]["type"] == "rate_limit_error" and int(refused.headers["Retry-After"]) >= 1
        assert [client.get("/v1/models", headers=bearer("key-b")).status_code for _ in range(3)] == [200] * 3
        assert client.get("/healthz").status_code == 200, "probes are never limited"


def test_without_keys_the_limit_is_per_address_and_forwarded_for_only_from_trusted_proxies() -> None:
    limits = Limits(rate_limit_per_minute=2)
    with guarded(limits, []) as base, httpx.Client(base_url=base) as client:
        spoofed = [client.get("/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
                   for i in range(3)]
        assert spoofed == [200, 200, 429], "an untrusted peer cannot pick its bucket"
    trusted = Limits(rate_limit_per_minute=2, trusted_proxies=["127.0.0.0/8"])
    with guarded(trusted, []) as base, httpx.Client(base_url=base) as client:
        first = [client.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.5"}).status_code
                 for _ in range(3)]
        assert first == [200, 200, 429]
        other = client.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.1, 203.0.113.6"})
        assert other.status_code == 200, "the rightmost untrusted hop is the client, not what it wrote before"


def test_a_401_flood_gets_429_even_for_a_right_key_then_recovers() -> None:
    limits = Limits(auth_failures_per_minute=60, trusted_proxies=["127.0.0.1/32"])
    with guarded(limits, KEYS) as base, httpx.Client(base_url=base) as client:
        attacker = {"X-Forwarded-For": "203.0.113.9"}
        statuses = [client.get("/v1/models", headers={**attacker, **bearer(f"guess-{i}")}).status_code
                    for i in range(61)]
        assert statuses == [401] * 60 + [429]
        locked = client.get("/v1/models", headers={**attacker, **bearer("key-a")})
        assert locked.status_code == 429 and "failed authentication" in locked.json()["error"]["message"]
        other = client.get("/v1/models", headers={"X-Forwarded-For": "203.0.113.10", **bearer("key-a")})
        assert other.status_code == 200, "other addresses are not locked out"
        time.sleep(1.1)
        assert client.get("/v1/models", headers={**attacker, **bearer("key-a")}).status_code == 200


def test_in_flight_limit_answers_503_and_frees_the_slot() -> None:
    limits = Limits(max_in_flight=2, retry_after_s=3)
    with guarded(limits, []) as base:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(httpx.get, f"{base}/v1/models?delay=1.5", timeout=10) for _ in range(2)]
            time.sleep(0.5)
            refused = httpx.get(f"{base}/v1/models", timeout=10)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "3"
            assert refused.json()["error"]["type"] == "service_unavailable"
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
            assert [f.result().status_code for f in slow] == [200, 200]
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200


def test_limiter_memory_is_bounded_and_keeps_recent_clients() -> None:
    limiter = RateLimiter(per_minute=1, max_clients=100)
    for i in range(5000):
        assert limiter.allow(f"client-{i}") is None
    assert len(limiter.buckets) == 100
    assert limiter.allow("client-4999") is not None, "a recent client keeps its empty bucket"
    assert limiter.allow("client-0") is None, "the oldest were forgotten"
    assert limiter.wait("client-4999") is not None and limiter.wait("fresh") is None
    assert "fresh" not in limiter.buckets, "wait() takes nothing and stores nothing"


@pytest.mark.parametrize(("peer", "header", "trusted", "expected"), [
    ("10.0.0.5", None, [], "10.0.0.5"),
    ("10.0.0.5", "1.2.3.4", [], "10.0.0.5"),
    ("10.0.0.5", "1.2.3.4", ["10.0.0.0/8"], "1.2.3.4"),
    ("10.0.0.5", "6.6.6.6, 1.2.3.4", ["10.0.0.0/8"], "1.2.3.4"),
    ("10.0.0.5", "1.2.3.4, 10.0.0.7", ["10.0.0.0/8"], "1.2.3.4"),
    ("10.0.0.5", "10.0.0.8, 10.0.0.7", ["10.0.0.0/8"], "10.0.0.8"),
    ("10.0.0.5", "not-an-ip", ["10.0.0.0/8"], "not-an-ip"),
    ("10.0.0.5", None, ["10.0.0.0/8"], "10.0.0.5"),
    ("2001:db8::1", "1.2.3.4", ["2001:db8::/32"], "1.2.3.4"),
])
def test_client_address(peer: str, header: str | None, trusted: list[str], expected: str) -> None:
    headers = [(b"x-forwarded-for", header.encode())] if header else []
    scope = {"client": (peer, 1234), "headers": headers}
    assert client_address(scope, Limits(trusted_proxies=trusted)) == expected
