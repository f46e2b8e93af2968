"""Helpers shared by the engine tests: a small SAE for the tiny LLaVA's 32-wide tower, test images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sae_modules.saes import SAE, SAEConfig, build_sae
from sae_modules.saes.base import SourceInfo

N_LATENTS = 96


def make_sae(architecture: str, layer: int, d_in: int = 32, model_id: str | None = None, seed: int = 0) -> SAE:
    """A random SAE whose latents fire on a fair share of tokens (threshold 0.2, jittered biases)."""
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture=architecture, d_in=d_in, n_latents=N_LATENTS, k=8, threshold=0.2,
                    source=SourceInfo(layer=layer, model_id=model_id))
    sae = build_sae(cfg).eval()
    with torch.no_grad():
        sae.b_enc.uniform_(-0.2, 0.2)
        sae.b_dec.normal_(0, 0.1)
    return sae


def images(n: int) -> list[Image.Image]:
    """n random RGB images of different sizes (the processor resizes and crops them)."""
    return [Image.fromarray((np.random.RandomState(s).rand(60 + 7 * s, 70, 3) * 255).astype("uint8")) for s in range(n)]
