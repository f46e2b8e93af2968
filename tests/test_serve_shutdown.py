"""`vlm-steer serve` as a user runs it: the printed first request works as claimed, and SIGTERM/SIGINT drain and exit 0.

The command runs as a subprocess on a free 127.0.0.1 port with the shipped demo model, Ray's
files in a fresh short temp dir (RAY_TMPDIR). Every process it started (Ray's GCS, raylet, workers,
Serve's controller, proxy and replicas) is recorded while it serves and must be gone after it exits.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from service.api.images import decode_image
from service.config import Limits
from tests.ray_app import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VLM_STEER = Path(sys.executable).parent / "vlm-steer"
EXAMPLE = ROOT / "examples" / "red_circle.png"


@dataclass
class Served:
    process: subprocess.Popen
    base_url: str
    lines: queue.Queue
    printed: list[str] = field(default_factory=list)

    def read_until(self, predicate, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                assert self.process.poll() is None, "vlm-steer serve exited:\n" + "".join(self.printed)
                continue
            self.printed.append(line)
            if predicate(line):
                return line
        raise AssertionError("vlm-steer serve did not print the expected line:\n" + "".join(self.printed))

    def session_processes(self, ray_dir: str) -> list[psutil.Process]:
        """The command's descendants, and any process naming its Ray temp dir (in case one was re-parented)."""
        found = {p.pid: p for p in psutil.Process(self.process.pid).children(recursive=True)}
        for proc in psutil.process_iter(["cmdline"]):
            if any(ray_dir in part for part in proc.info["cmdline"] or []):
                found.setdefault(proc.pid, proc)
        return list(found.values())


@contextmanager
def vlm_steer_serve() -> Iterator[tuple[Served, str]]:
    assert VLM_STEER.is_file(), f"{VLM_STEER} missing: `pip install -e .` installs the console script"
    ray_dir = tempfile.mkdtemp(prefix="vs", dir="/tmp")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VLM_STEER_CONFIG", "RAY_ADDRESS")}
    env.update(RAY_TMPDIR=ray_dir, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([str(VLM_STEER), "serve", "--host", "127.0.0.1", "--port", str(port),
                                "--num-cpus", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        yield Served(process, f"http://127.0.0.1:{port}", lines), ray_dir
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        shutil.rmtree(ray_dir, ignore_errors=True)


def _assert_all_gone(processes: list[psutil.Process], timeout_s: float = 30.0) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    assert not alive, [(p.pid, p.name()) for p in alive]


def _slow_body(body: bytes, pause_s: float) -> Iterator[bytes]:
    """The first half of the body, a pause (the request is in flight), the rest."""
    yield body[: len(body) // 2]
    time.sleep(pause_s)
    yield body[len(body) // 2:]


def test_first_request_works_as_printed_and_sigterm_drains_then_exits_0() -> None:
    assert EXAMPLE.is_file() and decode_image(EXAMPLE.read_bytes(), Limits()).size
    with vlm_steer_serve() as (served, ray_dir):
        served.read_until(lambda line: line.startswith("ready:"), 600)
        command = [served.read_until(lambda line: line.startswith("IMG="), 10)]
        command.append(served.read_until(lambda line: line.strip() == "JSON", 10))
        claim = served.read_until(lambda line: line.startswith("#"), 10)
        assert '"circle"' in claim and '"star"' in claim
        command_text = "".join(served.printed[served.printed.index(command[0]):])
        command_text = command_text[: command_text.index("\nJSON\n") + len("\nJSON\n")]
        assert "/v1/steer" in command_text and str(EXAMPLE) in command_text
        result = subprocess.run(["bash", "-c", command_text], check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        answers = {o["type"]: o["text"].lower() for o in json.loads(result.stdout)["outputs"]}
        assert "circle" in answers["DEFAULT"] and "star" in answers["STEERED"], answers

        processes = served.session_processes(ray_dir)
        assert len(processes) >= 3, "Ray's GCS, raylet and workers should be running"
        body = json.loads(command_text.split("<<JSON\n", 1)[1].rsplit("\nJSON", 1)[0]
                          .replace("$IMG", base64.b64encode(EXAMPLE.read_bytes()).decode()))
        in_flight: dict[str, httpx.Response] = {}

        def send() -> None:
            in_flight["response"] = httpx.post(
                f"{served.base_url}/v1/steer", content=_slow_body(json.dumps(body).encode(), 6.0),
                headers={"Content-Type": "application/json"}, timeout=120)

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(2.5)
        served.process.send_signal(signal.SIGTERM)
        sender.join(120)
        response = in_flight["response"]
        assert response.status_code == 200, response.text
        assert "star" in {o["type"]: o["text"] for o in response.json()["outputs"]}["STEERED"].lower()
        assert served.process.wait(120) == 0, "".join(served.printed)
        served.read_until(lambda line: line.startswith("SIGTERM: draining"), 10)
        _assert_all_gone(processes)


def test_sigint_stops_serve_and_ray_and_exits_0() -> None:
    with vlm_steer_serve() as (served, ray_dir):
        served.read_until(lambda line: line.startswith("ready:"), 600)
        processes = served.session_processes(ray_dir)
        assert len(processes) >= 3
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(120) == 0, "".join(served.printed)
        served.read_until(lambda line: line.startswith("SIGINT: draining"), 10)
        _assert_all_gone(processes)
