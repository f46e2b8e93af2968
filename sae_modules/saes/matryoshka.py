"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): nested latent prefixes that each must
reconstruct the input alone, so early latents learn general concepts and later ones refine them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae_modules.saes.base import SAEConfig, SAEConfigError
from sae_modules.saes.batchtopk import BatchTopKSAE
from sae_modules.saes.sparse_ops import Selection, sparse_decode
from sae_modules.saes.topk import squared_error


def group_sizes_from_fractions(n_latents: int, fractions: list[float]) -> list[int]:
    """Group sizes for `fractions` of `n_latents` (summing to 1); the last group takes the rounding rest."""
    if not fractions or any(f <= 0 for f in fractions):
        raise SAEConfigError(f"group_fractions {fractions} must be a non-empty list of positive numbers")
    if not math.isclose(sum(fractions), 1.0, rel_tol=1e-6):
        raise SAEConfigError(f"group_fractions {fractions} must sum to 1, not {sum(fractions)}")
    sizes = [int(f * n_latents) for f in fractions[:-1]]
    sizes.append(n_latents - sum(sizes))
    if any(s <= 0 for s in sizes):
        raise SAEConfigError(f"group_fractions {fractions} leave an empty group at n_latents={n_latents}")
    return sizes


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK selection and threshold θ (see `BatchTopKSAE`), trained with one reconstruction
    loss per prefix: latents of groups 0..i (plus b_dec) reconstruct x, and the loss is the mean of
    those prefix losses. The full reconstruction is the last prefix; `losses["l2"]` is its loss.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        if cfg.group_sizes is None or sum(cfg.group_sizes) != cfg.n_latents:
            raise SAEConfigError(f"group_sizes {cfg.group_sizes} must sum to n_latents={cfg.n_latents}")
        self.register_buffer("group_ends", torch.tensor(cfg.group_sizes).cumsum(0), persistent=False)

    def _recon_loss(
        self, x: Tensor, sel: Selection, values: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        group = torch.bucketize(sel.cols, self.group_ends, right=True)
        recon = self.b_dec.expand_as(x)
        prefix_losses = []
        for g in range(len(self._cfg.group_sizes)):
            keep = group == g
            recon = recon + sparse_decode(sel.subset(keep), values[keep], self.W_dec)
            prefix_losses.append(squared_error(x, recon))
        prefix = torch.stack(prefix_losses)
        return recon, prefix.mean(), {"l2": prefix[-1], "prefix_l2": prefix.mean()}
