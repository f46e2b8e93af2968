"""The vLLM async engine against the transformers backend, from the same steered embeddings.

Run by tests/test_vllm_backend.py in the vLLM venv (`make test-vllm`): builds nothing itself,
takes a LLaVA directory and an SAE directory, prints one JSON object of facts the test checks:
greedy parity with and without an edit, streamed deltas adding up to each answer, an aborted
request stopping early, and a short request submitted after a long one finishing first (which
a static batch cannot do). vLLM's CPU engine starts worker processes that re-import the main
module, hence the `__main__` guard.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file

from sae_modules.intervention_spec import Intervention
from service.engine.engine import SteeringEngine
from service.engine.generators.vllm_backend import AsyncVLLMGenerator
from service.engine.types import GenerationOutput, GenerationRequest, SamplingParams, SteerSpec, user_turn

PROMPTS = ("what is in the image?", "describe the color")
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")


def _hub_key(key: str) -> str:
    for prefix in TOWER_PREFIXES:
        if key.startswith(prefix):
            rest = key.removeprefix(prefix)
            return key if rest.startswith("vision_model.") else prefix + "vision_model." + rest
    return key


def hub_layout(model_dir: str, out_dir: Path) -> str:
    """A copy of the checkpoint with the tower's keys as llava-hf's hub checkpoints have them
    (`...vision_tower.vision_model.*`): transformers 5 saves them without `vision_model.`, which
    vLLM's LLaVA loader does not map. Checkpoints from the hub load into vLLM unchanged."""
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    for weights in out_dir.glob("*.safetensors"):
        tensors = load_file(weights)
        save_file({_hub_key(k): v for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    return str(out_dir)


class Listener:
    """Keeps deltas and finish times per request; cancels `cancel` once it has shown some text."""

    def __init__(self, cancel: int | None = None) -> None:
        self.texts: dict[int, str] = {}
        self.finished_at: dict[int, float] = {}
        self.cancel = cancel
        self.first_delta = threading.Event()

    def streams(self, index: int) -> bool:
        return True

    def delta(self, index: int, text: str) -> None:
        self.texts[index] = self.texts.get(index, "") + text
        self.first_delta.set()

    def finished(self, index: int, output: GenerationOutput) -> None:
        self.finished_at[index] = time.perf_counter()

    def cancelled(self, index: int) -> bool:
        return index == self.cancel and bool(self.texts.get(index))


def continuous_batching(vllm: AsyncVLLMGenerator, request: GenerationRequest) -> dict:
    """A 48-token request, then (once it streams) a 2-token one in another call: which finishes first."""
    long_request = GenerationRequest(request.conversation, request.image_embeds, SamplingParams(max_tokens=48))
    short_request = GenerationRequest(request.conversation, request.image_embeds, SamplingParams(max_tokens=2))
    long_listener, short_listener = Listener(), Listener()
    runner = threading.Thread(target=vllm.generate, args=([long_request], long_listener))
    runner.start()
    long_listener.first_delta.wait(timeout=300)
    vllm.generate([short_request], short_listener)
    runner.join(timeout=600)
    return {"short_first": short_listener.finished_at[0] < long_listener.finished_at[0]}


def main(model_dir: str, sae_dir: str) -> None:
    engine = SteeringEngine.load(model_dir, {"sae": sae_dir})
    pictures = [Image.fromarray((np.random.RandomState(s).rand(64, 64, 3) * 255).astype("uint8")) for s in range(2)]
    specs = [SteerSpec(want_default=True, want_stats=False),
             SteerSpec([Intervention(latent=3, value=30.0)], want_default=True, want_stats=False)]
    embeds = engine.steer_embeds(engine.preprocess(pictures), specs)
    params = SamplingParams(max_tokens=8)
    requests = [GenerationRequest(user_turn(prompt), rows, params)
                for prompt, result in zip(PROMPTS, embeds) for rows in (result.default, result.steered)]
    with tempfile.TemporaryDirectory() as tmp:
        vllm = AsyncVLLMGenerator(hub_layout(model_dir, Path(tmp) / "model"), engine.processor,
                                  {"dtype": "float32", "max_model_len": 256, "enforce_eager": True})
        streamed = Listener()
        vllm_outputs = vllm.generate(requests, streamed)
        long = [GenerationRequest(r.conversation, r.image_embeds, SamplingParams(max_tokens=32)) for r in requests[:2]]
        aborted = vllm.generate(long, Listener(cancel=0))
        batching = continuous_batching(vllm, requests[0])
        healthy = vllm.healthy()
        vllm.shutdown()
    answers = {
        "transformers": [out.text for out in engine.generate(requests)],
        "vllm": [out.text for out in vllm_outputs],
        "streamed": [streamed.texts.get(i, "") for i in range(len(requests))],
        "aborted_tokens": [out.completion_tokens for out in aborted],
        "healthy": healthy,
        **batching,
        "steering_changed": [float((r.steered - r.default).abs().max()) for r in embeds],
    }
    print("PARITY " + json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:3])
