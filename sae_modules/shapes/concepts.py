"""Which SAE latent stands for a concept (a colour, a shape), found from activations, never hard-coded.

A latent is selective for a concept when most of its activation mass lands on images of that
concept (precision) and it fires on most of those images (recall); the score is their product,
so a latent that fired once, on one red image, does not win "red".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def selectivity(per_image: Tensor, labels: Sequence[str], concept: str) -> Tensor:
    """Per-latent score in [0, 1] for `concept`; `per_image` is [n_images, n_latents], non-negative."""
    if per_image.shape[0] != len(labels):
        raise ValueError(f"labels: {len(labels)} labels for {per_image.shape[0]} images")
    inside = torch.tensor([label == concept for label in labels])
    if not inside.any():
        raise ValueError(f"concept: no image is labelled {concept!r}")
    mass = per_image.clamp(min=0)
    precision = mass[inside].sum(0) / mass.sum(0).clamp(min=1e-12)
    recall = (mass[inside] > 0).float().mean(0)
    return precision * recall


def most_selective_latent(per_image: Tensor, labels: Sequence[str], concept: str) -> tuple[int, float]:
    """The latent with the highest selectivity for `concept`, and that score."""
    scores = selectivity(per_image, labels, concept)
    best = int(scores.argmax())
    return best, float(scores[best])
