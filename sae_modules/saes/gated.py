"""Gated SAE (Rajamanoharan et al. 2024), inference only, for SAELens `gated` checkpoints.

The gate path is the ordinary pre-activation (b_enc plays SAELens' b_gate). The magnitude path
shares the encoder directions, rescaled per latent by exp(r_mag) and shifted by b_mag, so it is a
function of the gate pre-activation alone: mag_pre = (pre - b_enc) * exp(r_mag) + b_mag. That keeps
the module elementwise, so steering can encode a few latents without a full encode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_modules.saes.base import SAE, SAEConfig


class GatedSAE(SAE):
    elementwise = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_mag = nn.Parameter(torch.zeros(cfg.n_latents))

    def activation(self, pre: Tensor) -> Tensor:
        return self._gated(pre, self.b_enc, self.r_mag, self.b_mag)

    def _elementwise_activation(self, pre: Tensor, latents: Tensor) -> Tensor:
        return self._gated(pre, self.b_enc[latents], self.r_mag[latents], self.b_mag[latents])

    @staticmethod
    def _gated(pre: Tensor, b_gate: Tensor, r_mag: Tensor, b_mag: Tensor) -> Tensor:
        magnitude = ((pre - b_gate) * r_mag.exp() + b_mag).relu()
        return (pre > 0) * magnitude

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.b_mag *= scale
