"""Activation extraction on a ViT-B/32-shaped CLIP tower (random weights, 224 px, 50 tokens).

1. Reading one block: our hook that stops the forward pass after the block, against the usual
   `output_hidden_states=True` full forward, for an early, a middle and LLaVA's layer (-2).
2. The whole job (decode PNGs, preprocess, forward, select tokens, hash and write shards)
   against the bare forward pass over the same images: the job's overhead.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import FolderImages
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower

VIT_B_32 = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
)
N_IMAGES = 32
BATCH = 16


def _best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        CLIPVisionModel(CLIPVisionConfig(**VIT_B_32)).save_pretrained(root / "model")
        rng = np.random.default_rng(0)
        (root / "images").mkdir()
        for i in range(N_IMAGES):
            noise = rng.integers(0, 256, size=(256, 320, 3), dtype=np.uint8)
            Image.fromarray(noise).save(root / "images" / f"{i:03d}.png")
        tower = load_tower(str(root / "model"), device="cpu")
        source = FolderImages(root / "images")
        pixels = tower.preprocess([source.load(i) for i in range(BATCH)])

        def full_forward() -> None:
            with torch.no_grad():
                tower.module(pixel_values=pixels, output_hidden_states=True)

        baseline = _best_of(full_forward)
        print(f"one block of a 12-block tower, {BATCH} images; baseline full forward {baseline * 1e3:.0f} ms")
        for layer in (2, 5, -2):
            ours = _best_of(lambda layer=layer: tower.layer_output(pixels, layer))
            print(f"  layer {layer:>3}: hook + stop {ours * 1e3:6.0f} ms   speed-up x{baseline / ours:.2f}")

        all_pixels = tower.preprocess([source.load(i) for i in range(N_IMAGES)])
        bare = _best_of(lambda: [tower.layer_output(p, -2) for p in all_pixels.split(BATCH)], repeats=2)
        plan = ExtractionPlan(
            model="bench", layer=-2, tokens=TokenSelection.parse("random:2"), batch_size=BATCH, shard_size=16
        )
        runs = iter(range(10))
        job = _best_of(
            lambda: run_extraction(tower, source, root / f"out{next(runs)}", plan, progress=False), repeats=2
        )
        print(
            f"whole job, {N_IMAGES} PNGs 320x256 -> shards: {job:.2f} s; bare forward of the same images "
            f"{bare:.2f} s; job / forward = {job / bare:.2f}"
        )
