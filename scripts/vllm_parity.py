"""Greedy answers of the vLLM and the transformers backends from the same steered embeddings.

Run by tests/test_vllm_backend.py in the vLLM venv (`make test-vllm`): builds nothing itself,
takes a LLaVA directory and an SAE directory, prints one JSON object {"transformers": [...],
"vllm": [...]} with the token ids of each answer. vLLM's CPU engine starts worker processes that
re-import the main module, hence the `__main__` guard.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from PIL import Image

from sae_modules.intervention_spec import Intervention
from service.engine.engine import SteeringEngine
from service.engine.generators.vllm_backend import VLLMGenerator
from service.engine.types import GenerationRequest, SamplingParams, SteerSpec, user_turn

PROMPTS = ("what is in the image?", "describe the color")


def main(model_dir: str, sae_dir: str) -> None:
    engine = SteeringEngine.load(model_dir, {"sae": sae_dir})
    pictures = [Image.fromarray((np.random.RandomState(s).rand(64, 64, 3) * 255).astype("uint8")) for s in range(2)]
    specs = [SteerSpec(want_default=True, want_stats=False),
             SteerSpec([Intervention(latent=3, value=30.0)], want_default=True, want_stats=False)]
    embeds = engine.steer_embeds(engine.preprocess(pictures), specs)
    params = SamplingParams(max_tokens=8)
    requests = [GenerationRequest(user_turn(prompt), rows, params)
                for prompt, result in zip(PROMPTS, embeds) for rows in (result.default, result.steered)]
    vllm = VLLMGenerator(model_dir, engine.processor, dtype="float32", max_model_len=256, enforce_eager=True)
    tokenizer = engine.processor.tokenizer
    answers = {
        "transformers": [out.text for out in engine.generate(requests)],
        "vllm": [out.text for out in vllm.generate(requests)],
        "steering_changed": [float((r.steered - r.default).abs().max()) for r in embeds],
        "eos": tokenizer.eos_token,
    }
    print("PARITY " + json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:3])
