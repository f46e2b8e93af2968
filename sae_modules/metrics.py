"""Reconstruction and sparsity metrics of an SAE, accumulated over batches of any size.

FVU follows the paper: squared error summed over vectors and dimensions, divided by the total
variance of the inputs around their dataset mean (summed over dimensions). The mean is not known
until the end, so the variance is merged batch by batch with Chan's parallel update in float64,
which stays exact where a running Σx² - n·mean² would cancel catastrophically.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_modules.errors import VlmSteerError
from sae_modules.saes.base import fire_counts


class MetricsInputError(VlmSteerError):
    """Tensors handed to the metrics whose shapes do not fit together."""


class ReconstructionMetrics:
    """Streaming FVU, MSE, L0, dead and dense latent fractions.

    `update(x, x_hat, latents)` takes activations and reconstructions [..., d_in] and the latents,
    dense [..., n_latents] or the sparse COO [N, n_latents] of `SAE.forward`. A latent is dead if it
    never fired on the vectors seen and dense if it fired on more than `dense_cutoff` of them.
    """

    def __init__(self, n_latents: int, dense_cutoff: float = 0.1) -> None:
        if not 0 < dense_cutoff < 1:
            raise MetricsInputError(f"dense_cutoff={dense_cutoff} must be between 0 and 1")
        self.n_latents = n_latents
        self.dense_cutoff = dense_cutoff
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.squared_error = 0.0
        self.fires: Tensor | None = None

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents: Tensor) -> None:
        if x.shape != x_hat.shape:
            raise MetricsInputError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
        flat = x.reshape(-1, x.shape[-1]).double()
        n = flat.shape[0]
        if latents.shape[-1] != self.n_latents or latents.numel() // self.n_latents != n:
            raise MetricsInputError(
                f"latents {tuple(latents.shape)} do not hold {n} vectors of n_latents={self.n_latents}"
            )
        if n == 0:
            return
        batch_mean = flat.mean(0)
        batch_m2 = (flat - batch_mean).pow(2).sum(0)
        if self.mean is None or self.m2 is None:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            total = self.count + n
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + batch_m2 + delta.pow(2) * (self.count * n / total)
        self.count += n
        self.squared_error += float((flat - x_hat.reshape(flat.shape).double()).pow(2).sum())
        counts = fire_counts(latents).to(torch.int64)
        self.fires = counts if self.fires is None else self.fires + counts.to(self.fires.device)

    def compute(self) -> dict[str, float]:
        """fvu, mse (per element), l0 (mean active latents per vector), dead_fraction, dense_fraction."""
        if self.count == 0 or self.m2 is None or self.fires is None:
            raise MetricsInputError("no vectors seen: call update() before compute()")
        total_variance = float(self.m2.sum())
        return {
            "fvu": self.squared_error / total_variance if total_variance > 0 else float("nan"),
            "mse": self.squared_error / (self.count * self.m2.numel()),
            "l0": float(self.fires.sum()) / self.count,
            "dead_fraction": float((self.fires == 0).double().mean()),
            "dense_fraction": float((self.fires > self.dense_cutoff * self.count).double().mean()),
            "n_vectors": float(self.count),
        }
