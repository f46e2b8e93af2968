"""Schemathesis against the running app's /openapi.json: hundreds of valid and invalid requests, no 5xx.

Run by `make fuzz` (VLM_STEER_FUZZ_API_EXAMPLES examples per operation and generation mode); the
default test run has a short schemathesis pass in tests/test_service_app.py instead. The app is
the real one on a local Ray Serve with the tiny LLaVA, an API key and small limits, so generated
requests reach every check and, when valid, the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from tests.ray_app import local_serve
from tests.service_fixtures import write_tiny_sae

EXAMPLES = int(os.environ.get("VLM_STEER_FUZZ_API_EXAMPLES", "0"))
KEY = "fuzz-key"
pytestmark = [pytest.mark.slow, pytest.mark.opt_in,
              pytest.mark.skipif(EXAMPLES == 0, reason="long: `make fuzz` runs it")]


@pytest.fixture(scope="module")
def service(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("fuzz_sae") / "sae")
    replica = {"num_cpus": 0.25}
    settings = ServiceSettings(model={"id": "tiny", "path": str(tiny_llava_dir)}, saes={"a": {"path": str(sae_dir)}},
                               ingress=replica, steerer=replica, api_keys=[KEY],
                               limits={"max_tokens": 16, "max_image_bytes": 200_000, "max_image_pixels": 256 * 256,
                                       "auth_failures_per_minute": 10**6})
    with local_serve() as base:
        run_app(settings)
        wait_ready(base, 240)
        yield base


def _fuzz(operation, mode, service: str, failures: list[tuple]) -> int:
    """Send EXAMPLES generated requests for one operation; record 5xx and 4xx without an error body."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    calls = 0

    @settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate], database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:
        nonlocal calls
        calls += 1
        response = case.call(base_url=service, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
        where = (mode.value, case.method, case.path, response.status_code, response.text[:300])
        if response.status_code >= 500:
            failures.append(where)
        elif response.status_code >= 400:
            try:
                error = response.json().get("error")
            except ValueError:
                error = None
            if not (isinstance(error, dict) and error.get("type") and error.get("message")):
                failures.append(where)

    try:
        check()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        assert calls == 0, "only an operation with no input at all has no invalid request"
    return calls


def test_schemathesis_finds_no_server_errors_and_every_4xx_names_its_error(service: str) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{service}/openapi.json")
    failures: list[tuple] = []
    per_operation = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            per_operation[f"{mode.value} {operation.method.upper()} {operation.path}"] = _fuzz(
                operation, mode, service, failures)
    calls = sum(per_operation.values())
    print(f"{calls} generated requests:", per_operation)
    assert calls >= EXAMPLES, calls
    assert not failures, failures[:10]
    assert httpx.get(f"{service}/readyz", timeout=60).status_code == 200
