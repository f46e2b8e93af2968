"""One streaming pass over images: each latent's range, firing rate and highest-activating images.

The range feeds the monosemanticity score's min-max normalisation; the top images feed the
taxonomy depth, the steering prototypes and the browser's grids. Memory is O(latents x top_k).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from sae_modules.evaluation.errors import EvaluationError


@dataclass
class LatentSummary:
    lo: Tensor
    """[F] smallest per-image activation."""
    hi: Tensor
    """[F] largest per-image activation."""
    fires: Tensor
    """[F] int64: images on which the latent is positive."""
    top_values: Tensor
    """[F, k] highest per-image activations, descending."""
    top_images: Tensor
    """[F, k] int64 indices of those images."""
    n_images: int

    @property
    def density(self) -> Tensor:
        """Fraction of images on which each latent fires."""
        return self.fires.double() / self.n_images

    @property
    def live(self) -> Tensor:
        """Latents whose activation varies over the images (the others cannot be normalised)."""
        return self.hi > self.lo


class LatentSummaryAccumulator:
    """Feed batches of per-image activations [n, F] in image order; `result()` gives the summary."""

    def __init__(self, n_latents: int, top_k: int = 16) -> None:
        if top_k < 0:
            raise EvaluationError(f"top_k must be 0 (no top images) or more, got {top_k}", "top_k")
        self.top_k = top_k
        self.lo = torch.full((n_latents,), torch.inf, dtype=torch.float64)
        self.hi = torch.full((n_latents,), -torch.inf, dtype=torch.float64)
        self.fires = torch.zeros(n_latents, dtype=torch.int64)
        self.top_values = torch.empty(0, n_latents, dtype=torch.float32)
        self.top_images = torch.empty(0, n_latents, dtype=torch.int64)
        self.n_images = 0

    def update(self, acts: Tensor) -> None:
        if acts.ndim != 2 or acts.shape[1] != self.lo.shape[0]:
            raise EvaluationError(f"activations batch has shape {tuple(acts.shape)}, expected [n, {self.lo.shape[0]}]",
                                  "activations")
        acts = acts.float()
        lo, hi = torch.aminmax(acts, dim=0)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):   # min/max propagate NaN and infinity
            raise EvaluationError(f"activations of images {self.n_images}..{self.n_images + len(acts) - 1} "
                                  "contain NaN or infinity", "activations")
        self.lo = torch.minimum(self.lo, lo.double())
        self.hi = torch.maximum(self.hi, hi.double())
        self.fires += (acts > 0).sum(dim=0)
        self.n_images += len(acts)
        if self.top_k == 0:
            return
        batch_values, batch_rows = acts.topk(min(self.top_k, len(acts)), dim=0)
        values = torch.cat([self.top_values, batch_values])
        images = torch.cat([self.top_images, batch_rows + self.n_images - len(acts)])
        keep = min(self.top_k, len(values))
        self.top_values, order = values.topk(keep, dim=0)
        self.top_images = images.gather(0, order)

    def result(self) -> LatentSummary:
        if self.n_images == 0:
            raise EvaluationError("no images: the activations are empty", "activations")
        return LatentSummary(self.lo, self.hi, self.fires, self.top_values.T.contiguous(),
                             self.top_images.T.contiguous(), self.n_images)


def summarize_latents(batches: Iterable[tuple[Tensor, Tensor | None]], n_latents: int,
                      top_k: int = 16) -> LatentSummary:
    """Pass over (activations, embeddings) batches, using the activations only."""
    acc = LatentSummaryAccumulator(n_latents, top_k)
    for acts, _ in batches:
        acc.update(acts)
    return acc.result()
