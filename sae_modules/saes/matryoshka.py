"""Matryoshka BatchTopK SAE (Bussmann et al. 2025): nested latent prefixes that each must
reconstruct the input alone, so early latents learn general concepts and later ones refine them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae_modules.saes.base import SAEConfig, SAEConfigError
from sae_modules.saes.batchtopk import BatchTopKSAE
from sae_modules.saes.sparse_ops import Selection, crow_from_rows, sparse_decode


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
    loss per prefix: latents of groups 0..i (plus b_dec) reconstruct x. The loss weights them as the
    reference trainer does with its default group weights 1/G: mean over prefixes of (1/G)·L_i,
    i.e. Σ L_i / G², which sets their balance against AuxK (`auxk_alpha` · AuxK).
    `losses["prefix_l2"]` is that weighted term; `losses["l2"]` the full (last prefix) loss.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        if cfg.group_sizes is None or sum(cfg.group_sizes) != cfg.n_latents:
            raise SAEConfigError(f"group_sizes {cfg.group_sizes} must sum to n_latents={cfg.n_latents}")
        self.register_buffer("group_ends", torch.tensor(cfg.group_sizes).cumsum(0), persistent=False)

    def _recon_loss(
        self, x: Tensor, sel: Selection, values: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """All group contributions in one `embedding_bag` with one bag per (vector, group): a
        vector's entries are sorted by latent, hence by group, so the bags are contiguous; one
        decode means one decoder gradient instead of one per group."""
        n_groups = len(self._cfg.group_sizes)
        bag = sel.rows * n_groups + torch.bucketize(sel.cols, self.group_ends, right=True)
        n_bags = x.shape[0] * n_groups
        bags = Selection(bag, sel.cols, crow_from_rows(bag, n_bags), (n_bags, self.n_latents))
        parts = sparse_decode(bags, values, self.W_dec).view(x.shape[0], n_groups, -1)
        prefixes = parts.cumsum(dim=1) + self.b_dec
        prefix_l2 = (x.unsqueeze(1) - prefixes).pow(2).sum(-1).mean(0)
        weighted = prefix_l2.mean() / n_groups
        return prefixes[:, -1], weighted, {"l2": prefix_l2[-1], "prefix_l2": weighted}
