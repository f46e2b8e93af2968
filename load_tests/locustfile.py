"""Locust load test for vlm-steer: a realistic mix of steering, chat, encode and bad requests, with SLO gates.

Run it as its own process (Locust's gevent must not share a process with torch or Ray), e.g.
    locust -f load_tests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 8 -t 60s \
        --slo-failure-ratio 0.01 --slo-p95-ms 5000 --csv out/load/vlm-steer --html out/load/report.html
The SLO gates (options, or env LOCUST_SLO_FAILURE_RATIO / LOCUST_SLO_P95_MS) alone set the exit
code: 0 when both hold, 1 when one is broken, 2 when the service is not reachable at start.
Bad requests are part of the mix; each counts as a success only when the service answers 4xx
with an error body, so a server that accepts garbage (or crashes on it) fails the run.
Env: VLM_STEER_API_KEY (sent as a bearer token), LOAD_IMAGES (a folder of .png/.jpg to send
instead of the synthetic shapes).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import sys
from pathlib import Path

import gevent
import requests
from locust import HttpUser, between, events, task
from locust.stats import CSV_STATS_INTERVAL_SEC
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)
COLOURS = ["red", "green", "blue", "yellow"]
PROMPTS = ["What color is the shape?", "What shape is this?", "Describe the image."]


def _synthetic_image(rng: random.Random) -> bytes:
    """A coloured shape on a light background, the kind of image the demo model was trained on."""
    img = Image.new("RGB", (64, 64), (245, 245, 245))
    x, y, s = rng.randint(4, 24), rng.randint(4, 24), rng.randint(18, 36)
    draw = ImageDraw.Draw(img)
    colour = rng.choice(COLOURS)
    if rng.random() < 0.5:
        draw.ellipse((x, y, x + s, y + s), fill=colour)
    else:
        draw.rectangle((x, y, x + s, y + s), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _load_images() -> list[str]:
    folder = os.environ.get("LOAD_IMAGES")
    files = sorted(Path(folder).glob("*.png")) + sorted(Path(folder).glob("*.jpg")) if folder else []
    raw = [(f.read_bytes(), "jpeg" if f.suffix == ".jpg" else "png") for f in files]
    raw = raw or [(_synthetic_image(random.Random(i)), "png") for i in range(8)]
    return [f"data:image/{kind};base64,{base64.b64encode(data).decode()}" for data, kind in raw]


IMAGES = _load_images()


def _auth_headers() -> dict[str, str]:
    key = os.environ.get("VLM_STEER_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _bad_requests() -> list[tuple[str, str, dict | str]]:
    """(name, path, body): requests a correct server must refuse with a 4xx error body."""
    image = IMAGES[0]
    return [
        ("steer: image not base64", "/v1/steer", {"prompt": "x", "image": "not base64 at all!"}),
        ("steer: latent out of range", "/v1/steer",
         {"prompt": "x", "image": image, "interventions": [{"latent": 10**9, "value": 1.0}]}),
        ("steer: unknown SAE", "/v1/steer", {"prompt": "x", "image": image, "sae": "no-such-sae"}),
        ("steer: NaN value", "/v1/steer",
         {"prompt": "x", "image": image, "interventions": [{"latent": 0, "value": "nan"}]}),
        ("steer: max_tokens over limit", "/v1/steer", {"prompt": "x", "image": image, "max_tokens": 10**6}),
        ("steer: not JSON", "/v1/steer", "{not json"),
        ("chat: no image", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
        ("chat: unknown model", "/v1/chat/completions", {"model": "no-such-model", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}),
        ("encode: top_k 0", "/v1/encode", {"image": image, "top_k": 0}),
    ]


BAD_REQUESTS = _bad_requests()


@events.init_command_line_parser.add_listener
def _slo_options(parser) -> None:
    parser.add_argument("--slo-failure-ratio", type=float, env_var="LOCUST_SLO_FAILURE_RATIO", default=0.01,
                        help="Fail the run (exit 1) when the failure ratio exceeds this.")
    parser.add_argument("--slo-p95-ms", type=float, env_var="LOCUST_SLO_P95_MS", default=10_000.0,
                        help="Fail the run (exit 1) when the p95 response time over all requests exceeds this (ms).")


@events.init.add_listener
def _check_service(environment, **_kwargs) -> None:
    """Refuse to start against a service that is down, and learn the SAE sizes the steering mix may use."""
    host = (environment.host or "").rstrip("/")
    if not host:
        return
    try:
        response = requests.get(f"{host}/v1/saes", headers=_auth_headers(), timeout=10)
        response.raise_for_status()
        saes = response.json()["data"]
    except (requests.RequestException, ValueError, KeyError) as exc:
        log.error("vlm-steer is not reachable at %s (GET /v1/saes: %s). Start it first, e.g. `make serve`.",
                      host, exc)
        sys.exit(2)
    environment.n_latents = min(sae["n_latents"] for sae in saes)


def _broken_slos(num_requests: int, fail_ratio: float, p95_ms: float, max_failure_ratio: float,
                max_p95_ms: float) -> list[str]:
    """The broken gates, in words; empty when the run meets its SLOs."""
    broken = []
    if num_requests == 0:
        broken.append("no requests were made")
    if fail_ratio > max_failure_ratio:
        broken.append(f"failure ratio {fail_ratio:.4f} > {max_failure_ratio}")
    if p95_ms > max_p95_ms:
        broken.append(f"p95 {p95_ms:.0f} ms > {max_p95_ms:g} ms")
    return broken


@events.quitting.add_listener
def _slo_gate(environment, **_kwargs) -> None:
    """Set the exit code from the SLOs only: Locust's default (1 on any failure) ignores the allowed ratio."""
    if environment.process_exit_code is not None:
        return
    total = environment.stats.total
    opts = environment.parsed_options
    p95 = total.get_response_time_percentile(0.95) or 0.0
    broken = _broken_slos(total.num_requests, total.fail_ratio, p95, opts.slo_failure_ratio, opts.slo_p95_ms)
    print(f"SLO: requests={total.num_requests} rps={total.total_rps:.2f} p50={total.median_response_time:.0f}ms "
          f"p95={p95:.0f}ms failure_ratio={total.fail_ratio:.4f} -> "
          f"{'FAIL: ' + '; '.join(broken) if broken else 'PASS'}", flush=True)
    environment.process_exit_code = 1 if broken else 0
    if opts.csv_prefix:
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)  # the CSV writer runs once a second: let it record the final stats


class SteeringUser(HttpUser):
    """An app developer's traffic: mostly steering with 0-8 edits, some chat and encode, a few mistakes."""

    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        self.client.headers.update(_auth_headers())
        self.n_latents = getattr(self.environment, "n_latents", 1)

    def _interventions(self, n: int) -> list[dict]:
        return [{"latent": random.randrange(self.n_latents), "mode": random.choice(["pin", "nudge", "mul"]),
                 "value": round(random.uniform(0, 20), 2), "tokens": random.choice(["all", "patches"])}
                for _ in range(n)]

    @task(6)
    def steer(self) -> None:
        self.client.post("/v1/steer", name="/v1/steer", json={
            "prompt": random.choice(PROMPTS), "image": random.choice(IMAGES),
            "interventions": self._interventions(random.randint(0, 8)),
            "types": random.choice([["STEERED"], ["STEERED", "DEFAULT"]]), "max_tokens": 8})

    @task(2)
    def chat(self) -> None:
        self.client.post("/v1/chat/completions", name="/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": random.choice(IMAGES)}},
                {"type": "text", "text": "What is shown in this image? Use exactly one word!"}]}],
            "max_tokens": 8, "steering": {"interventions": self._interventions(random.randint(0, 2))}})

    @task(2)
    def encode(self) -> None:
        self.client.post("/v1/encode", name="/v1/encode",
                         json={"image": random.choice(IMAGES), "top_k": 8, "tokens": "all", "reduce": "mean"})

    @task(1)
    def bad_request(self) -> None:
        name, path, body = random.choice(BAD_REQUESTS)
        payload = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, str) \
            else {"json": body}
        with self.client.post(path, name=f"[bad] {name}", catch_response=True, **payload) as resp:
            try:
                error = resp.json()["error"]
                has_error_body = bool(error["type"] and error["message"])
            except (ValueError, KeyError, TypeError):
                has_error_body = False
            if 400 <= resp.status_code < 500 and has_error_body:
                resp.success()
            else:
                resp.failure(f"bad request got {resp.status_code}, expected a 4xx error body")
