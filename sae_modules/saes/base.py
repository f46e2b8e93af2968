"""The interface every SAE variant shares, and the config that travels with its weights.

Weights follow SAELens' orientation (W_enc [d_in, n_latents], W_dec [n_latents, d_in]) so that
exporting and importing never transposes by accident. A saved SAE always takes *raw* activations:
the training-time input scale is folded into the biases (and threshold) before saving.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import Tensor, nn

from sae_modules.activations.blocks import Layer
from sae_modules.errors import VlmSteerError

Architecture = Literal["relu", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated"]
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
#: Architectures that load from foreign checkpoints but have no training loss here.
INFERENCE_ONLY = ("jumprelu", "gated")


class SourceInfo(BaseModel):
    """Where the activations an SAE was trained on came from; used to attach it to the right layer."""

    model_config = ConfigDict(extra="forbid")

    model_id: str | None = None
    layer: Layer | None = Field(
        None, description="Block whose residual output is read (negative counts from the end), or 'last': the "
                          "tower's image embedding."
    )
    tokens: str | None = Field(
        None, description="Token selection used for training: all, cls, patches, mean, random:K."
    )
    dataset: str | None = None


class SAEConfigError(VlmSteerError):
    """An SAE config or registry lookup that cannot work; the message names the field."""


class SAEInputError(VlmSteerError):
    """Activations whose shape does not fit the SAE; the message gives both shapes."""


class SAESettings(BaseModel):
    """The choices that define an SAE and its training loss apart from its size.

    Shared, not copied: a saved SAE's `SAEConfig` extends it with the sizes and the learned θ, and
    a training run's `sae` section (`sae_modules.train.config.SAESection`) with sizes relative to
    the activations. Defaults are the paper's (Pach et al., dictionary_learning's trainers).
    """

    model_config = ConfigDict(extra="forbid")

    architecture: Architecture
    k: PositiveInt | None = Field(None, description="Active latents per sample (TopK family).")
    rescale_acts_by_decoder_norm: bool = Field(
        False, description="SAELens topk option: latents are scaled by their decoder norm before selection."
    )
    l1_coeff: float = Field(0.0, ge=0, description="ReLU SAE sparsity penalty.")
    auxk_alpha: float = Field(
        0.03, ge=0, description="Weight of the AuxK loss on dead latents (the paper's scripts: 0.03)."
    )
    auxk_k: PositiveInt | None = Field(None, description="Latents the AuxK loss uses; default d_in // 2.")
    auxk_trains_encoder: bool = Field(
        True,
        description="AuxK's gradient reaches the dead latents' encoder (the paper's scripts); false: their "
        "picked activations are constants and AuxK trains their decoder rows only (sparsify's AuxK).",
    )
    dead_window: PositiveInt = Field(
        10_000_000, description="A latent unfired for this many samples is dead."
    )
    threshold_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay of the BatchTopK threshold.")


class SAEConfig(SAESettings):
    """Everything needed to rebuild an SAE module from its tensors, plus provenance and metrics."""

    d_in: PositiveInt
    n_latents: PositiveInt
    threshold: float | None = Field(
        None, description="Global inference threshold θ of BatchTopK/Matryoshka (raw activation units)."
    )
    group_sizes: list[PositiveInt] | None = Field(
        None, description="Matryoshka nested group sizes, summing to n_latents."
    )
    source: SourceInfo = Field(default_factory=SourceInfo)
    metrics: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_architecture_fields(self) -> SAEConfig:
        if self.architecture in TOPK_FAMILY and self.k is None:
            raise ValueError(f"architecture {self.architecture!r} needs k")
        if self.k is not None and self.k > self.n_latents:
            raise ValueError(f"k={self.k} exceeds n_latents={self.n_latents}")
        if self.architecture == "matryoshka_batchtopk":
            if not self.group_sizes or sum(self.group_sizes) != self.n_latents:
                raise ValueError(f"group_sizes {self.group_sizes} must sum to n_latents={self.n_latents}")
        elif self.group_sizes is not None:
            raise ValueError(f"group_sizes is only for matryoshka_batchtopk, not {self.architecture!r}")
        if self.auxk_k is not None and self.auxk_k > self.n_latents:
            raise ValueError(f"auxk_k={self.auxk_k} exceeds n_latents={self.n_latents}")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0")
        return self


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns: enough to train on and to log.

    `latents` is detached (the loss already holds the graph). Dense SAEs (ReLU) return a dense
    [B, n_latents] tensor; the TopK family returns a coalesced sparse COO tensor of the same shape,
    because densifying B x n_latents every step costs more than the sparse decode. Use
    `latents.to_dense()` (a no-op on dense tensors) or `fire_counts` to read either.
    """

    recon: Tensor
    latents: Tensor
    loss: Tensor
    losses: dict[str, Tensor]


class SAE(nn.Module):
    """Base class: encoder/decoder parameters, the shared maths, and the training-time constraints.

    Subclasses define `activation` (the inference nonlinearity applied to pre-activations) and
    `forward` (training semantics, which may differ: BatchTopK selects over the batch while training
    but uses the learned threshold θ at inference).
    """

    #: A latent depends only on its own pre-activation, so a subset of latents can be encoded alone.
    elementwise: bool = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self._cfg = cfg
        w_dec = torch.randn(cfg.n_latents, cfg.d_in)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    @property
    def cfg(self) -> SAEConfig:
        """The config, current with any state the module keeps on device (BatchTopK's θ)."""
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: SAEConfig) -> None:
        self._cfg = cfg

    @property
    def d_in(self) -> int:
        return self._cfg.d_in

    @property
    def n_latents(self) -> int:
        return self._cfg.n_latents

    def _flatten_input(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [N, d_in], with a clear error for the wrong width."""
        if x.ndim == 0 or x.shape[-1] != self.d_in:
            raise SAEInputError(f"activations of shape {tuple(x.shape)} do not end in d_in={self.d_in}")
        return x.reshape(-1, self.d_in)

    def pre_acts(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Inference latents for activations of any leading shape [..., d_in]."""
        return self.activation(self.pre_acts(x))

    def encode_subset(self, x: Tensor, latents: Tensor) -> Tensor:
        """Inference values of the given latents only: [..., len(latents)].

        Only elementwise SAEs (a fixed threshold or ReLU) allow it; this is what makes an
        error-preserving edit cost a few dot products instead of a full encode.
        """
        if not self.elementwise:
            raise TypeError(f"{type(self).__name__} is not elementwise; encode all latents instead")
        pre = (x - self.b_dec) @ self.W_enc[:, latents] + self.b_enc[latents]
        return self._elementwise_activation(pre, latents)

    def _elementwise_activation(self, pre: Tensor, latents: Tensor) -> Tensor:
        """The activation restricted to `latents`; elementwise subclasses override it."""
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        raise NotImplementedError

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Keep decoder rows at unit norm, as the paper's trainers do after every step."""
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component along each (unit) decoder row, so steps do not fight the norm."""
        if self.W_dec.grad is None:
            return
        grad, w = self.W_dec.grad, self.W_dec.data
        # Row-wise dot products as a batched matmul: no [n_latents, d_in] temporary.
        parallel = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)
        grad.addcmul_(parallel, w, value=-1)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on x / scale take raw x: latents and biases grow by `scale`.

        Valid because every activation here is positively homogeneous; the threshold scales with them.
        """
        self.b_enc.data *= scale
        self.b_dec.data *= scale
        if self._cfg.threshold is not None:
            self._cfg = self._cfg.model_copy(update={"threshold": self._cfg.threshold * scale})


def fire_counts(latents: Tensor) -> Tensor:
    """How many vectors each latent fired on (was non-zero for): int64 [n_latents].

    Takes the dense [..., n_latents] latents of `encode` or the sparse COO latents of `forward`.
    """
    if latents.is_sparse:
        latents = latents.coalesce()
        cols = latents.indices()[-1][latents.values() != 0]
        return torch.bincount(cols, minlength=latents.shape[-1])
    return (latents != 0).reshape(-1, latents.shape[-1]).sum(0)
