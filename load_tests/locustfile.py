"""Locust load test for vlm-steer: a realistic mix of steering, chat, encode and bad requests.

Run it as its own process (Locust's gevent must not share a process with torch or Ray):
    locust -f load_tests/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 4 -t 60s \
        --slo-failure-ratio 0.01 --slo-p95-ms 5000 --csv out/load --html out/load.html
The SLO gates (options, or env LOCUST_SLO_FAILURE_RATIO / LOCUST_SLO_P95_MS) set the exit code.
Bad requests are part of the mix and count as successes only when the service answers 4xx.
"""

from __future__ import annotations

import base64
import io
import os
import random
from pathlib import Path

from locust import HttpUser, between, events, task
from PIL import Image, ImageDraw

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COLOURS = ["red", "green", "blue", "yellow"]


def _synthetic_image(rng: random.Random) -> bytes:
    """A shape on a light background, for when no example images are shipped beside the test."""
    img = Image.new("RGB", (64, 64), (245, 245, 245))
    x, y, s = rng.randint(4, 24), rng.randint(4, 24), rng.randint(18, 36)
    ImageDraw.Draw(img).ellipse((x, y, x + s, y + s), fill=rng.choice(COLOURS))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _load_images() -> list[str]:
    folder = Path(os.environ.get("LOAD_IMAGES", EXAMPLES))
    files = sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg"))
    raw = [f.read_bytes() for f in files] or [_synthetic_image(random.Random(i)) for i in range(8)]
    return ["data:image/png;base64," + base64.b64encode(b).decode() for b in raw]


IMAGES = _load_images()


@events.init_command_line_parser.add_listener
def _slo_options(parser) -> None:
    parser.add_argument("--slo-failure-ratio", type=float, env_var="LOCUST_SLO_FAILURE_RATIO", default=0.01,
                        help="Fail the run when the failure ratio exceeds this.")
    parser.add_argument("--slo-p95-ms", type=float, env_var="LOCUST_SLO_P95_MS", default=10_000.0,
                        help="Fail the run when the aggregated p95 response time exceeds this (ms).")


@events.quitting.add_listener
def _slo_gate(environment, **_kwargs) -> None:
    total = environment.stats.total
    opts = environment.parsed_options
    p95 = total.get_response_time_percentile(0.95) or 0.0
    failed = []
    if total.num_requests == 0:
        failed.append("no requests were made")
    if total.fail_ratio > opts.slo_failure_ratio:
        failed.append(f"failure ratio {total.fail_ratio:.4f} > {opts.slo_failure_ratio}")
    if p95 > opts.slo_p95_ms:
        failed.append(f"p95 {p95:.0f} ms > {opts.slo_p95_ms:.0f} ms")
    print(f"SLO: requests={total.num_requests} rps={total.total_rps:.2f} p50={total.median_response_time:.0f}ms "
          f"p95={p95:.0f}ms failure_ratio={total.fail_ratio:.4f} -> {'FAIL: ' + '; '.join(failed) if failed else 'PASS'}")
    if failed:
        environment.process_exit_code = 1


class SteeringUser(HttpUser):
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        key = os.environ.get("VLM_STEER_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        saes = self.client.get("/v1/saes", name="/v1/saes").json()["data"]
        self.n_latents = min(s["n_latents"] for s in saes)

    def _interventions(self, n: int) -> list[dict]:
        return [{"latent": random.randrange(self.n_latents), "mode": random.choice(["pin", "nudge", "mul"]),
                 "value": round(random.uniform(0, 20), 2), "tokens": random.choice(["all", "patches"])}
                for _ in range(n)]

    @task(6)
    def steer(self) -> None:
        self.client.post("/v1/steer", name="/v1/steer", json={
            "prompt": random.choice(["What color is the shape?", "What shape is this?", "Describe the image."]),
            "image": random.choice(IMAGES), "interventions": self._interventions(random.randint(0, 8)),
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
        body = random.choice([
            {"prompt": "x", "image": "not base64 at all", "interventions": []},
            {"prompt": "x", "image": random.choice(IMAGES), "interventions": [{"latent": 10**9, "value": 1.0}]},
            {"prompt": "x", "image": random.choice(IMAGES), "sae": "no-such-sae", "interventions": []},
            {"prompt": "x", "image": random.choice(IMAGES), "interventions": [{"latent": 0, "value": "nan"}]},
        ])
        with self.client.post("/v1/steer", name="/v1/steer [bad]", json=body, catch_response=True) as resp:
            if 400 <= resp.status_code < 500 and "error" in resp.json():
                resp.success()
            else:
                resp.failure(f"bad request got {resp.status_code}, expected a 4xx error body")
