"""JumpReLU SAE (per-latent thresholds), inference only: how foreign checkpoints run here.

SAELens saves JumpReLU SAEs, and also BatchTopK and Matryoshka SAEs after training, in this form:
a latent fires with its ReLU value when its pre-activation exceeds its own threshold.
`relu(pre) * (pre > θ_i)` equals SAELens' `relu(pre) * (pre > relu(θ_i))` for every sign of θ_i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_modules.saes.base import SAE, SAEConfig


class JumpReLUSAE(SAE):
    elementwise = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(cfg.n_latents))

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def _elementwise_activation(self, pre: Tensor, latents: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold[latents])

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold *= scale
