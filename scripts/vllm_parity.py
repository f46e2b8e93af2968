"""Greedy answers of the vLLM and the transformers backends from the same steered embeddings.

Run by tests/test_vllm_backend.py in the vLLM venv (`make test-vllm`): builds nothing itself,
takes a LLaVA directory and an SAE directory, prints one JSON object {"transformers": [...],
"vllm": [...]} with the text of each answer. vLLM's CPU engine starts worker processes that
re-import the main module, hence the `__main__` guard.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file

from sae_modules.intervention_spec import Intervention
from service.engine.engine import SteeringEngine
from service.engine.generators.vllm_backend import VLLMGenerator
from service.engine.types import GenerationRequest, SamplingParams, SteerSpec, user_turn

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
        vllm = VLLMGenerator(hub_layout(model_dir, Path(tmp) / "model"), engine.processor, dtype="float32",
                             max_model_len=256, enforce_eager=True)
        vllm_texts = [out.text for out in vllm.generate(requests)]
    answers = {
        "transformers": [out.text for out in engine.generate(requests)],
        "vllm": vllm_texts,
        "steering_changed": [float((r.steered - r.default).abs().max()) for r in embeds],
    }
    print("PARITY " + json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:3])
