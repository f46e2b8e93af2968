"""Rate limits and failed-auth limits on the real app on a local Ray Serve, over HTTP.

Ray Serve's HTTP proxy (uvicorn) already replaces the client address by the X-Forwarded-For
entry when the TCP peer is 127.0.0.1 (its FORWARDED_ALLOW_IPS default), so each test here
speaks as its own forwarded address; that also shows the address reaches the ingress replica.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from tests.ray_app import local_serve
from tests.service_fixtures import write_tiny_sae

pytestmark = pytest.mark.slow

KEYS = ["ray-key-a", "ray-key-b"]
REPLICA = {"num_cpus": 0.25}


@pytest.fixture(scope="module")
def service(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("guard_sae") / "sae")
    settings = ServiceSettings(model={"id": "tiny", "path": str(tiny_llava_dir)}, saes={"a": {"path": str(sae_dir)}},
                               ingress=REPLICA, steerer=REPLICA, api_keys=KEYS,
                               limits={"rate_limit_per_minute": 3, "auth_failures_per_minute": 5})
    with local_serve() as base:
        run_app(settings)
        wait_ready(base, 240)
        yield base


def _get(base: str, key: str, address: str) -> httpx.Response:
    return httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": address},
                     timeout=60)


def test_429_per_api_key_through_ray(service: str) -> None:
    statuses = [_get(service, "ray-key-a", f"198.51.100.{i}").status_code for i in range(4)]
    assert statuses == [200, 200, 200, 429], "one bucket per key, whatever address it comes from"
    refused = _get(service, "ray-key-a", "198.51.100.50")
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["Retry-After"]
    assert _get(service, "ray-key-b", "198.51.100.1").json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{service}/readyz", timeout=60).status_code == 200


def test_401_flood_through_ray_gets_429(service: str) -> None:
    statuses = [_get(service, f"guess-{i}", "203.0.113.77").status_code for i in range(6)]
    assert statuses == [401] * 5 + [429]
    locked = _get(service, "ray-key-b", "203.0.113.77")
    assert locked.status_code == 429 and "failed authentication" in locked.json()["error"]["message"]
    assert _get(service, "ray-key-b", "203.0.113.78").status_code == 200
    assert httpx.get(f"{service}/readyz", timeout=60).status_code == 200
