"""The Locust load test (`load_tests/locustfile.py`), run headless in its own process against the real app.

Locust cannot share a process with torch or Ray (gevent), so every run here is a subprocess and
the checks read its exit code, its SLO line and its CSV report.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ServiceSettings
from service.serve_cli import run_app, wait_ready
from tests.ray_app import free_port, local_serve
from tests.service_fixtures import write_tiny_sae

pytestmark = pytest.mark.slow

LOCUSTFILE = Path(__file__).resolve().parents[1] / "load_tests" / "locustfile.py"
REPLICA = {"num_cpus": 0.25}
SLO_LINE = re.compile(r"SLO: requests=(\d+) rps=([\d.]+) p50=(\d+)ms p95=(\d+)ms failure_ratio=([\d.]+) -> (.*)")


def locust(host: str, out: Path, seconds: int, *slo: str) -> subprocess.CompletedProcess:
    """One bounded headless run writing `out`_stats.csv and `out`.html."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "VLM_STEER_API_KEY"))}
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", host, "-u", "4", "-r", "4",
               "-t", f"{seconds}s", "--stop-timeout", "20", "--only-summary", "--csv", str(out),
               "--html", f"{out}.html", *slo]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=seconds + 90, env=env)


def stats_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(f"{out}_stats.csv", newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def service(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    sae_dir = write_tiny_sae(tmp_path_factory.mktemp("load_sae") / "sae")
    settings = ServiceSettings(model={"id": "tiny", "path": str(tiny_llava_dir)}, saes={"a": {"path": str(sae_dir)}},
                               ingress=REPLICA, steerer=REPLICA)
    with local_serve() as base:
        run_app(settings)
        wait_ready(base, 300)
        yield base


def test_mixed_load_meets_its_slos_and_every_bad_request_gets_a_4xx(service: str, tmp_path: Path) -> None:
    out = tmp_path / "mix"
    run = locust(service, out, 15, "--slo-failure-ratio", "0", "--slo-p95-ms", "60000")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = stats_rows(out)
    bad = {name: row for name, row in rows.items() if name.startswith("[bad] ")}
    assert bad and sum(int(row["Request Count"]) for row in bad.values()) > 0
    assert all(row["Failure Count"] == "0" for row in bad.values()), bad
    for name in ("/v1/steer", "/v1/chat/completions", "/v1/encode"):
        assert int(rows[name]["Request Count"]) > 0 and rows[name]["Failure Count"] == "0", rows[name]
    assert (out.parent / "mix.html").stat().st_size > 0

    requests, rps, p50, p95, ratio, verdict = SLO_LINE.search(run.stdout + run.stderr).groups()
    total = rows["Aggregated"]
    per_endpoint = [row for name, row in rows.items() if name != "Aggregated"]
    assert int(requests) == int(total["Request Count"]) == sum(int(row["Request Count"]) for row in per_endpoint)
    assert float(ratio) == sum(int(row["Failure Count"]) for row in per_endpoint) / int(requests) == 0.0
    assert int(p95) == round(float(total["95%"])) and int(p50) == round(float(total["Median Response Time"]))
    assert float(rps) == pytest.approx(float(total["Requests/s"]), abs=0.01)
    assert verdict == "PASS"


def test_an_impossible_p95_slo_fails_the_run(service: str, tmp_path: Path) -> None:
    run = locust(service, tmp_path / "strict", 4, "--slo-p95-ms", "0.001")
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAIL: p95" in run.stdout + run.stderr


def test_a_service_that_is_down_fails_clearly(tmp_path: Path) -> None:
    run = locust(f"http://127.0.0.1:{free_port()}", tmp_path / "down", 4)
    assert run.returncode == 2
    assert "not reachable" in run.stderr and "make serve" in run.stderr
