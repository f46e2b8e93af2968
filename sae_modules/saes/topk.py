"""TopK SAE (Gao et al. 2024): each vector keeps its k largest latents; AuxK revives dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_modules.saes.base import SAE, SAEConfig, SAEConfigError, SAEInputError, SAEOutput
from sae_modules.saes.sparse_ops import (
    Selection,
    pick_pre_acts,
    sparse_decode,
    sparse_latents,
    top_positive_selection,
    topk_selection,
)


def squared_error(x: Tensor, recon: Tensor) -> Tensor:
    """Mean over vectors of the summed squared error (the paper's L2 loss)."""
    return (x - recon).pow(2).sum(-1).mean()


class TopKSAE(SAE):
    """Per-vector top-k at training and at inference.

    `forward` is the fast training path: the pre-activations go into a reused workspace without
    autograd, only the selected entries carry gradients (see `sparse_ops`), and `latents` in the
    output is a sparse COO tensor. `encode` returns dense latents.
    """

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None:
            raise SAEConfigError(f"{type(self).__name__} needs k")
        if cfg.rescale_acts_by_decoder_norm:
            raise SAEConfigError(
                "rescale_acts_by_decoder_norm is not supported: fold the decoder norms into "
                "W_enc/b_enc (and divide W_dec by them) when importing the checkpoint"
            )
        super().__init__(cfg)
        self._workspaces: dict[str, Tensor] = {}

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self._cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def _select(self, pre: Tensor) -> Selection:
        """The entries of the [B, n_latents] pre-activations that fire in this forward."""
        return topk_selection(pre, self._cfg.k)

    def _workspace(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer kept between steps under `name`: a fresh batch-sized allocation every step
        costs page faults (for the pre-activations, a quarter of the encoder matmul). Nothing saved
        for backward points into one, so reusing it on the next call is safe."""
        ws = self._workspaces.get(name)
        if ws is None or ws.numel() != numel or ws.dtype != dtype or ws.device != device:
            ws = self._workspaces[name] = torch.empty(numel, dtype=dtype, device=device)
        return ws

    def __getstate__(self) -> dict:
        """Copies (`copy.deepcopy` for the weights to ship, pickling) leave the step buffers behind:
        at 16k latents and batch 4,096 they weigh 600 MB."""
        return {**self.__dict__, "_workspaces": {}}

    @torch.no_grad()
    def _pre_acts_into_workspace(self, x: Tensor) -> Tensor:
        """Pre-activations [B, n_latents] in a reused buffer."""
        ws = self._workspace("pre", x.shape[0] * self.n_latents, x.dtype, x.device)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc, out=ws.view(x.shape[0], self.n_latents))

    def _recon_loss(
        self, x: Tensor, sel: Selection, values: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(reconstruction, reconstruction loss, loss terms to log)."""
        recon = sparse_decode(sel, values, self.W_dec) + self.b_dec
        l2 = squared_error(x, recon)
        return recon, l2, {"l2": l2}

    def _auxk_loss(self, pre: Tensor, x: Tensor, residual: Tensor, dead_mask: Tensor) -> Tensor:
        """How well each vector's top k_aux dead latents reconstruct its residual, over the residual's
        variance. Only their positive pre-activations are picked and decoded (see
        `top_positive_selection`): the rest would pass the ReLU as zeros."""
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self._cfg.auxk_k or self.d_in // 2, dead.numel())
        block = self._workspace("auxk_block", pre.numel(), pre.dtype, pre.device)
        sel = top_positive_selection(pre, k_aux, dead, self._bool_workspace(pre), block)
        values = pick_pre_acts(pre, x, self.W_enc, self.b_enc, self.b_dec, sel)
        if not self._cfg.auxk_trains_encoder:
            values = values.detach()
        e_hat = sparse_decode(sel, values, self.W_dec)
        err = squared_error(residual, e_hat)
        variance = squared_error(residual, residual.mean(0))
        return (err / variance).nan_to_num(0.0)

    def _bool_workspace(self, pre: Tensor) -> Tensor:
        """A reused bool buffer of pre's size, for the selections' marks."""
        return self._workspace("marks", pre.numel(), torch.bool, pre.device)

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """Training semantics. `dead_mask` (bool [n_latents]) turns on the AuxK loss over the latents
        it marks that do not fire on this batch: the reference trainers count this batch before
        deciding who is dead, so a latent that fires now is never dead now."""
        flat = self._flatten_input(x).to(self.W_enc.dtype)
        if dead_mask is not None and dead_mask.shape != (self.n_latents,):
            raise SAEInputError(f"dead_mask has shape {tuple(dead_mask.shape)}, expected ({self.n_latents},)")
        pre = self._pre_acts_into_workspace(flat)
        sel = self._select(pre)
        values = pick_pre_acts(pre, flat, self.W_enc, self.b_enc, self.b_dec, sel).relu()
        self._observe(values)
        recon, loss, losses = self._recon_loss(flat, sel, values)
        auxk = loss.new_zeros(())
        if dead_mask is not None and self._cfg.auxk_alpha > 0 and bool(dead_mask.any()):
            dead_mask = dead_mask.clone()
            dead_mask[sel.cols[values > 0]] = False
            if bool(dead_mask.any()):
                auxk = self._auxk_loss(pre, flat, (flat - recon).detach(), dead_mask)
                loss = loss + self._cfg.auxk_alpha * auxk
        losses["auxk"] = auxk
        return SAEOutput(recon.reshape(x.shape), sparse_latents(sel, values), loss, losses)

    def _observe(self, values: Tensor) -> None:
        """Hook for state learned from the selected activations (BatchTopK's threshold)."""
