"""ReLU SAE with an L1 penalty (Bricken et al. 2023): the standard baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_modules.saes.base import SAE, SAEOutput


class ReLUSAE(SAE):
    """f = relu(pre); loss = L2 + l1_coeff · Σ_j f_j ‖W_dec[j]‖ (the norm weight keeps the penalty
    honest if decoder rows are not held at unit norm). Dense throughout: its latents are not sparse
    enough in training for a sparse path to pay. `dead_mask` is accepted and ignored (no AuxK)."""

    elementwise = True

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def _elementwise_activation(self, pre: Tensor, latents: Tensor) -> Tensor:
        return torch.relu(pre)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        flat = self._flatten_input(x).to(self.W_enc.dtype)
        f = torch.relu(self.pre_acts(flat))
        recon = self.decode(f)
        l2 = (flat - recon).pow(2).sum(-1).mean()
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = l2 + self._cfg.l1_coeff * l1
        return SAEOutput(recon.reshape(x.shape), f.detach(), loss, {"l2": l2, "l1": l1})
