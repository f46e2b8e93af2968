"""The ingress's edges on the real app on a local Ray Serve, over HTTP: rate limits, failed-auth limits and
remote image URLs (one app, so Ray starts once).

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
from tests.service_fixtures import data_url, noise_image, write_tiny_sae
from tests.test_remote_images import Server, server  # noqa: F401 - the local image server fixture

pytestmark = pytest.mark.slow

KEYS = ["ray-key-a", "ray-key-b", "ray-key-c", "ray-key-d"]
"""Each key may send 3 requests a minute; the tests use separate keys so they do not share buckets."""
REPLICA = {"num_cpus": 0.25}


@pytest.fixture(scope="module")
def service(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("guard_sae") / "sae")
    settings = ServiceSettings(model={"id": "tiny", "path": str(tiny_llava_dir)}, saes={"a": {"path": str(sae_dir)}},
                               ingress=REPLICA, steerer=REPLICA, api_keys=KEYS,
                               limits={"rate_limit_per_minute": 3, "auth_failures_per_minute": 5,
                                       "allow_remote_images": True, "remote_image_allowed_networks": ["127.0.0.1/32"]})
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


def _chat(base: str, url: str, key: str) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "describe the image ."}]
    return httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                           "max_tokens": 6},
                      headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": "192.0.2.1"}, timeout=120)


def test_remote_image_urls_through_ray(service: str, server: Server) -> None:  # noqa: F811
    """Fetched images answer like the same image sent inline; blocked addresses are refused by field."""
    image_server = f"http://127.0.0.1:{server.server_address[1]}"
    server.seen.clear()
    fetched = _chat(service, f"{image_server}/img.png", KEYS[2])
    assert fetched.status_code == 200, fetched.text
    assert [path for path, _ in server.seen] == ["/img.png"], "the ingress fetched it from the local server"
    inline = _chat(service, data_url(noise_image(5, (30, 20))), KEYS[3])
    assert fetched.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
    param = "messages.0.content.0.image_url.url"
    for key, url in ((KEYS[2], "http://169.254.169.254/latest/meta-data/"),
                     (KEYS[3], f"{image_server}/redirect?to=http://10.0.0.1/x.png")):
        refused = _chat(service, url, key)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
        assert "private, loopback" in refused.json()["error"]["message"]
    assert httpx.get(f"{service}/readyz", timeout=60).status_code == 200
