"""BatchTopK SAE (Bussmann et al. 2024): k * B latents per batch while training, one global
threshold θ at inference."""

from __future__ import annotations

import torch
from torch import Tensor

from sae_modules.saes.base import SAEConfig
from sae_modules.saes.sparse_ops import Selection, batch_topk_selection, threshold_selection
from sae_modules.saes.topk import TopKSAE

UNSET = -1.0


class BatchTopKSAE(TopKSAE):
    """Training mode: the k * B largest pre-activations of the batch fire, so busy vectors may use
    more than k latents and quiet ones fewer. Eval mode and `encode`: f = relu(pre) * (pre > θ), a
    per-latent rule, so the SAE is elementwise and `encode_subset` works.

    θ is a non-persistent buffer `threshold` (0-d, on the module's device): every training forward
    moves it toward the smallest selected positive activation, θ ← decay·θ + (1 - decay)·min, the
    first one sets it outright. `state_dict()` therefore holds only the four weight tensors; θ
    travels in the config: the `cfg` property reads the buffer (one device sync), so a saved `cfg`
    is always current, and assigning `cfg` (or `build_sae(cfg)`) writes `cfg.threshold` into the
    buffer. While θ is unset (None in the config) inference is plain ReLU. Set `learn_threshold`
    to False to freeze θ (e.g. during warm-up steps).
    """

    elementwise = True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(UNSET), persistent=False)
        self.learn_threshold = True
        self.cfg = cfg

    @property
    def cfg(self) -> SAEConfig:
        theta = float(self.threshold)
        return self._cfg.model_copy(update={"threshold": None if theta < 0 else theta})

    @cfg.setter
    def cfg(self, cfg: SAEConfig) -> None:
        self._cfg = cfg
        self.threshold.fill_(UNSET if cfg.threshold is None else cfg.threshold)

    def activation(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold.clamp_min(0))

    def _elementwise_activation(self, pre: Tensor, latents: Tensor) -> Tensor:
        return self.activation(pre)

    def _select(self, pre: Tensor) -> Selection:
        if self.training:
            return batch_topk_selection(pre, self._cfg.k, mask_out=self._bool_workspace(pre))
        return threshold_selection(pre, self.threshold)

    @torch.no_grad()
    def _observe(self, values: Tensor) -> None:
        if not (self.training and self.learn_threshold) or values.numel() == 0:
            return
        positive = torch.where(values > 0, values, torch.inf).min()
        batch_min = torch.where(positive.isinf(), 0.0, positive).to(self.threshold.dtype)
        decay = self._cfg.threshold_decay
        ema = decay * self.threshold + (1 - decay) * batch_min
        self.threshold.copy_(torch.where(self.threshold < 0, batch_min, ema))

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.threshold.copy_(torch.where(self.threshold < 0, self.threshold, self.threshold * scale))
