"""Helpers for the service tests: a tiny SAE for the tiny LLaVA, images as data URLs, an engine."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from sae_modules.formats.native import save_sae
from sae_modules.saes import SAEConfig, build_sae
from sae_modules.saes.base import SourceInfo

D_IN = 32
N_LATENTS = 64


def write_tiny_sae(path: Path, seed: int = 0, layer: int = -2) -> Path:
    """A random BatchTopK SAE on the tiny tower's layer `layer`, saved in our checkpoint format."""
    import torch

    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=D_IN, n_latents=N_LATENTS, k=4, threshold=0.05,
                              source=SourceInfo(layer=layer, tokens="all")))
    return save_sae(sae, path)


def noise_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(encoded(image, fmt)).decode()}"
