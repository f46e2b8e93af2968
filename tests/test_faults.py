"""Fault tolerance of the real app on a local Ray, under continuous client load.

Two replicas of each deployment (ingress and the colocated steer+generate model), as a
production config would run them:
- a model replica's process is SIGKILLed: Ray Serve starts a new one, only the requests that
  were in flight on it fail (as 503 JSON errors, not 500s), and /readyz answers 200 again;
- a new app version (a changed setting) is rolled out with `serve.run`: Serve replaces the
  replicas one at a time, so no request fails while the load keeps running.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import pytest

from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from tests.ray_app import local_serve
from tests.service_fixtures import N_LATENTS, data_url, noise_image, write_tiny_sae

pytestmark = pytest.mark.slow

APP = "faults"
TWO_REPLICAS = {"num_replicas": 2, "num_cpus": 0.25}
WORKERS = 4
"""Client threads; each has at most one request in flight, so at most this many can be on a killed replica."""


def replica_pids(deployment: str) -> set[int]:
    """PIDs of the live replica actors of `deployment` in the test app (Serve names them ServeReplica:app:name)."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # this test's Ray, not another on the host
                         filters=[("class_name", "=", f"ServeReplica:{APP}:{deployment}"), ("state", "=", "ALIVE")])
    return {actor.pid for actor in actors}


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(0.25)


@dataclass
class Outcome:
    start: float
    end: float
    status: int
    body: str


class Load:
    """Client threads sending small steering requests back to back until the block ends; every outcome is kept."""

    def __init__(self, base_url: str, workers: int = WORKERS) -> None:
        self.base_url = base_url
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _run(self, worker: int) -> None:
        body = {"prompt": "describe the image .", "image": data_url(noise_image(worker)), "max_tokens": 4,
                "interventions": [{"latent": (7 * worker) % N_LATENTS, "mode": "pin", "value": 10.0}]}
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    response = client.post("/v1/steer", json=body)
                    status, text = response.status_code, response.text
                except httpx.HTTPError as exc:
                    status, text = 0, repr(exc)
                with self._lock:
                    self.outcomes.append(Outcome(start, time.monotonic(), status, text))

    def successes_since(self, since: float) -> int:
        with self._lock:
            return sum(o.status == 200 and o.start >= since for o in self.outcomes)

    def wait_for_successes(self, count: int, since: float, timeout_s: float = 120) -> None:
        wait_until(lambda: self.successes_since(since) >= count, timeout_s, f"{count} successful requests")


@pytest.fixture(scope="module")
def settings(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ServiceSettings:
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("fault_sae") / "sae")
    return ServiceSettings(model={"id": "tiny", "path": str(tiny_llava_dir)}, saes={"a": {"path": str(sae_dir)}},
                           app_name=APP, limits={"max_tokens": 32},
                           ingress=TWO_REPLICAS, steerer=TWO_REPLICAS)


@pytest.fixture(scope="module")
def service(settings: ServiceSettings):
    with local_serve(dashboard=True) as base:
        run_app(settings)
        wait_ready(base, 300)
        yield base


def test_killed_replica_is_restarted_and_only_its_in_flight_requests_fail(service: str) -> None:
    before = replica_pids("SteerGenerate")
    assert len(before) == 2
    victim = min(before)
    with Load(service) as load:
        load.wait_for_successes(2 * WORKERS, since=0.0)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(replica_pids("SteerGenerate") - {victim}) == 2, 180, "a replacement replica")
        wait_ready(service, 60)
        recovered_at = time.monotonic()
        load.wait_for_successes(2 * WORKERS, since=recovered_at)
    failed = [o for o in load.outcomes if o.status != 200]
    print(f"killed pid {victim}: {len(load.outcomes)} requests, {len(failed)} failed, "
          f"recovery {recovered_at - killed_at:.1f} s")
    assert victim not in replica_pids("SteerGenerate")
    assert len(failed) <= WORKERS, [(o.status, o.body[:200]) for o in failed]
    assert all(o.status == 503 and '"service_unavailable"' in o.body for o in failed), failed
    assert all(killed_at <= o.end and o.start < recovered_at for o in failed)
    assert httpx.get(f"{service}/readyz", timeout=10).status_code == 200


def test_config_rollout_under_load_fails_no_request(service: str, settings: ServiceSettings) -> None:
    probe = {"prompt": "describe the image .", "image": data_url(noise_image(9)), "max_tokens": 24}
    assert httpx.post(f"{service}/v1/steer", json=probe, timeout=120).status_code == 200
    old = {name: replica_pids(name) for name in ("Ingress", "SteerGenerate")}
    new_settings = settings.model_copy(update={"limits": settings.limits.model_copy(update={"max_tokens": 16})})
    with Load(service) as load:
        load.wait_for_successes(2 * WORKERS, since=0.0)
        rollout_at = time.monotonic()
        run_app(new_settings)
        wait_until(lambda: all(not (replica_pids(name) & pids) and len(replica_pids(name)) == 2
                               for name, pids in old.items()), 180, "all replicas replaced")
        done_at = time.monotonic()
        load.wait_for_successes(2 * WORKERS, since=done_at)
    during = [o for o in load.outcomes if rollout_at <= o.start <= done_at]
    failed = [o for o in load.outcomes if o.status != 200]
    print(f"rollout took {done_at - rollout_at:.1f} s: {len(during)} requests during it, {len(failed)} failed")
    assert not failed, [(o.status, o.body[:200]) for o in failed]
    assert sum(o.status == 200 for o in during) >= WORKERS
    refused = httpx.post(f"{service}/v1/steer", json=probe, timeout=120)
    assert refused.status_code == 422 and "limit 16" in refused.json()["error"]["message"]
