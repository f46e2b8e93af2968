"""Service overhead, batching gain and streaming latency on the tiny random demo model, all on one local Ray.

- overhead: p50 of HTTP /v1/steer end to end over p50 of the same request as one in-process
  `SteeringEngine.steer` call (both with one torch thread, as a 1-CPU replica gets), the two calls
  alternating so both see the same machine load. Goal <= 1.10.
- batching: requests/s of 16 concurrent clients with `max_batch_size=16` over `max_batch_size=1`. Goal >= 2.
- mixed: 16 concurrent clients streaming /v1/steer with max_tokens spread over 4..64: requests/s,
  p50/p95 latency and p50/p95 time to first token, for both batch sizes.
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from service.api.images import load_image
from service.assets import build_random_demo
from service.config import ServiceSettings
from service.engine.types import SamplingParams, SteerSpec, user_turn
from service.serve_cli import run_app, wait_ready

PROMPT = "describe the image ."
MAX_TOKENS = 16
LATENCY_REQUESTS = 30
CLIENTS = 16
REQUESTS_PER_CLIENT = 4
MIXED_TOKENS = [4 + (60 * i) // (CLIENTS - 1) for i in range(CLIENTS)]
BATCH_WAIT_S = 0.01


def _image_url(seed: int) -> str:
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _body(seed: int, max_tokens: int = MAX_TOKENS) -> dict:
    return {"prompt": PROMPT, "image": _image_url(seed), "max_tokens": max_tokens,
            "interventions": [{"latent": 3, "mode": "pin", "value": 20.0}]}


def load_engine(model_dir: Path, sae_dir: Path):
    from service.engine.engine import SteeringEngine

    return SteeringEngine.load(str(model_dir), {"demo": str(sae_dir)})


def paired_p50(engine, base: str) -> tuple[float, float]:
    """p50 of the in-process call and of the HTTP call, alternating so both see the same machine load."""
    from sae_modules.intervention_spec import Intervention
    from service.config import Limits
    from service.engine.types import SteerJob

    spec = SteerSpec(interventions=[Intervention(latent=3, value=20.0)], sae_id="demo")
    params = SamplingParams(max_tokens=MAX_TOKENS)
    limits = Limits()
    local, remote = [], []
    with httpx.Client(timeout=120) as client:
        for i in range(LATENCY_REQUESTS + 3):
            start = time.perf_counter()
            engine.steer([SteerJob(load_image(_image_url(i), limits), user_turn(PROMPT), spec, params)])
            local.append(time.perf_counter() - start)
            start = time.perf_counter()
            client.post(f"{base}/v1/steer", json=_body(i)).raise_for_status()
            remote.append(time.perf_counter() - start)
    return statistics.median(local[3:]), statistics.median(remote[3:])


def batch_totals(base: str) -> tuple[float, float]:
    """(images, batches) the model replicas have run so far, from the ingress's steer_batch_size histogram."""
    text = httpx.get(f"{base}/metrics").text
    values = dict(re.findall(r"^(steer_batch_size_(?:sum|count)) (\S+)$", text, re.MULTILINE))
    return float(values.get("steer_batch_size_sum", 0)), float(values.get("steer_batch_size_count", 0))


def throughput(base: str) -> float:
    def client(worker: int) -> None:
        with httpx.Client(timeout=300) as http:
            for i in range(REQUESTS_PER_CLIENT):
                http.post(f"{base}/v1/steer", json=_body(worker * 100 + i)).raise_for_status()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return CLIENTS * REQUESTS_PER_CLIENT / (time.perf_counter() - start)


def streamed(http: httpx.Client, base: str, body: dict) -> tuple[float, float]:
    """(seconds to the first delta event, seconds to the result event) of one streamed /v1/steer."""
    start = time.perf_counter()
    first = None
    with http.stream("POST", f"{base}/v1/steer", json={**body, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "event: delta" and first is None:
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (total if first is None else first), total


def mixed(base: str) -> tuple[float, list[float], list[float]]:
    """req/s, latencies and times to first token of 16 streaming clients with max_tokens spread over 4..64."""
    latencies, firsts = [], []

    def client(worker: int) -> None:
        with httpx.Client(timeout=300) as http:
            for i in range(2):
                first, total = streamed(http, base, _body(worker * 100 + i, MIXED_TOKENS[(worker + i) % CLIENTS]))
                firsts.append(first)
                latencies.append(total)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return 2 * CLIENTS / (time.perf_counter() - start), latencies, firsts


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[round(q * 100) - 1]


def _settings(model_dir: Path, sae_dir: Path, batch: int) -> ServiceSettings:
    return ServiceSettings(model={"id": "tiny", "path": str(model_dir)}, saes={"demo": {"path": str(sae_dir)}},
                           steerer={"num_cpus": 1.0, "max_ongoing_requests": 64}, ingress={"num_cpus": 0.25},
                           limits={"max_tokens": 64},
                           batching={"max_batch_size": batch, "batch_wait_timeout_s": BATCH_WAIT_S})


def main() -> None:
    import ray
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="vsb", dir="/tmp"))
    rows = []
    try:
        model_dir, sae_dir = build_random_demo(work / "demo")
        torch.set_num_threads(1)
        engine = load_engine(model_dir, sae_dir)
        ray.init(_temp_dir=str(work / "ray"), include_dashboard=False, num_cpus=2, log_to_driver=False)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        for batch in (16, 1):
            run_app(_settings(model_dir, sae_dir, batch))
            wait_ready(base, 300)
            local, remote = paired_p50(engine, base)
            images, batches = batch_totals(base)
            rps = throughput(base)
            images_after, batches_after = batch_totals(base)
            mixed_rps, latencies, firsts = mixed(base)
            rows.append((batch, local, remote, rps, (images_after - images) / (batches_after - batches), mixed_rps,
                         latencies, firsts))
            print(f"batch {batch}: in-process p50 {local * 1e3:.1f} ms, http p50 {remote * 1e3:.1f} ms, "
                  f"{rps:.2f} req/s, mean batch {rows[-1][4]:.1f}, mixed {mixed_rps:.2f} req/s", flush=True)
            serve.delete("vlm-steer")
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(f"tiny random demo model, {MAX_TOKENS} new tokens, one torch thread per process, {CLIENTS} clients")
    print(f"{'batch':>5} {'local p50 ms':>13} {'http p50 ms':>12} {'overhead':>9} {'added ms':>9} {'req/s':>7} "
          f"{'mean batch':>10}")
    for batch, local, remote, rps, size, *_ in rows:
        print(f"{batch:>5} {local * 1e3:>13.1f} {remote * 1e3:>12.1f} {remote / local:>9.2f} "
              f"{(remote - local) * 1e3:>9.1f} {rps:>7.2f} {size:>10.1f}")
    print(f"streamed, max_tokens {MIXED_TOKENS[0]}..{MIXED_TOKENS[-1]}, {CLIENTS} clients x 2 requests")
    print(f"{'batch':>5} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'ttft p50 s':>11} {'ttft p95 s':>11}")
    for batch, *_, mixed_rps, latencies, firsts in rows:
        print(f"{batch:>5} {mixed_rps:>7.2f} {p(latencies, 0.5):>7.2f} {p(latencies, 0.95):>7.2f} "
              f"{p(firsts, 0.5):>11.2f} {p(firsts, 0.95):>11.2f}")
    by = {batch: (remote / local, rps) for batch, local, remote, rps, *_ in rows}
    print(f"batching gain {by[16][1] / by[1][1]:.2f}x (goal >= 2), overhead at batch 16 {by[16][0]:.2f} "
          "(goal <= 1.10)")


if __name__ == "__main__":
    main()
