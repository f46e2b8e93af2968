"""Shared fixtures: a tiny LLaVA-1.5-shaped checkpoint on disk, built offline from configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_modules.shapes.builder import build_llava, build_processor, build_tokenizer

pytest_plugins = ["ci_skips"]

TINY_WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "what", "is", "in", "the", "image", "?",
              "describe", "color", "shape", "it", "yes", "no", ".")
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
             "num_key_value_heads": 1, "max_position_embeddings": 256}
TINY_IMAGE_SIZE, TINY_PATCH_SIZE = 56, 14


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight LLaVA (CLIP 3 blocks x 32, Llama 2 x 64, 16 patches) with its processor, saved
    by `save_pretrained` so tests load it through the same code as a hub checkpoint.

    The LM head gets unit-variance rows and a zero EOS row, so greedy answers run for several
    tokens instead of stopping at once (a default init makes near-uniform logits)."""
    path = tmp_path_factory.mktemp("tiny_llava")
    processor = build_processor(build_tokenizer(TINY_WORDS), TINY_IMAGE_SIZE, TINY_PATCH_SIZE)
    model = build_llava(processor, vision=TINY_VISION, text=TINY_TEXT, seed=0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
        model.lm_head.weight[processor.tokenizer.eos_token_id] = 0.0
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def local_ray():
    """A 2-CPU local Ray (tests/ray_app.py), or the one already running in this process."""
    import ray

    from tests.ray_app import local_ray as ray_cluster

    if ray.is_initialized():
        yield ray
        return
    with ray_cluster(num_cpus=2):
        yield ray

