"""The edit maths: apply a list of latent interventions to one image's activations at an SAE's layer.

Two ways to hand the edit back to the tower:
- paper mode (`use_error_term=False`): the layer output becomes the reconstruction of the edited
  latents, as in Pach et al. Nothing edited still changes the output (by the SAE's error).
- error-preserving mode: x + Σ_k (f'_k − f_k)·W_dec[k], the identity when nothing is edited. The
  error is taken against the *unedited* reconstruction, so it can never cancel an edit.

With an elementwise SAE (a threshold or ReLU per latent) the error-preserving edit needs only the
edited latents' encoder columns (`SAE.encode_subset`): a few dot products per token instead of a
full encode, which is what keeps steering nearly free. Everything runs in float32.

Token scopes follow the tower's layout: token 0 is CLS, tokens 1.. are patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_modules.intervention_spec import Intervention, InterventionError, TokenScope
from sae_modules.saes.base import SAE

#: Above this fraction of firing latents a dense decode is faster than a sparse one.
SPARSE_DECODE_DENSITY = 0.05


@dataclass
class Edit:
    """One image's edited layer output and, per distinct edited latent, its mean over the edited tokens."""

    output: Tensor
    latents: list[int]
    before: list[float]
    after: list[float]


@dataclass
class ReconstructionStats:
    """How well the SAE explains the unedited activations of one image."""

    l0: float
    fvu: float


def token_mask(scope: TokenScope | list[int], n_tokens: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean [n_tokens] mask of the tokens a scope names (CLS is token 0)."""
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    if scope == "all":
        mask[:] = True
    elif scope == "cls":
        mask[0] = True
    elif scope == "patches":
        mask[1:] = True
    else:
        mask[torch.as_tensor(scope, dtype=torch.long, device=device)] = True
    return mask


def can_use_fast_path(sae: SAE, use_error_term: bool, pre_zero: bool) -> bool:
    """Whether an edit can skip the full encode: error-preserving, nothing zeroed, latents independent."""
    return use_error_term and not pre_zero and sae.elementwise


def decode_latents(sae: SAE, latents: Tensor) -> Tensor:
    """`sae.decode` of [T, n_latents] latents, as a sparse matmul when few of them fire.

    A sparse SAE fires a few dozen latents per token out of tens of thousands, so a dense decode
    would spend nearly all of its time multiplying zeros; the result is the same sum.
    """
    if latents.count_nonzero().item() > SPARSE_DECODE_DENSITY * latents.numel():
        return sae.decode(latents)
    return torch.sparse.mm(latents.to_sparse(), sae.W_dec) + sae.b_dec


def edit_activations(
    sae: SAE,
    x: Tensor,
    interventions: list[Intervention],
    *,
    use_error_term: bool,
    pre_zero: bool = False,
    latents: Tensor | None = None,
    fast: bool = True,
    value_bound: float | None = None,
) -> Edit:
    """Apply `interventions` (in order) to one image's activations x [T, d_in]; returns the new output.

    `latents` is the full unedited encode of x if the caller already has it (for statistics); without
    it the fast path is taken when allowed (`fast` and `can_use_fast_path`), else a full encode.
    With `value_bound`, every edited latent value must end finite and within ±bound after all
    interventions compose (each may be in bounds while `mul` after `pin` is not): else
    `InterventionError` on `interventions`, naming the ones that touch the latent.
    """
    x = x.float()
    ids = sorted({iv.latent for iv in interventions})
    column = {latent: j for j, latent in enumerate(ids)}
    index = torch.tensor(ids, dtype=torch.long, device=x.device)

    if latents is None and not (fast and can_use_fast_path(sae, use_error_term, pre_zero)):
        latents = sae.encode(x)
    if latents is None:
        current = sae.encode_subset(x, index)
    else:
        current = latents[:, index]

    edited = torch.zeros_like(current) if pre_zero else current.clone()
    touched = torch.zeros_like(current, dtype=torch.bool)
    for iv in interventions:
        mask = token_mask(iv.tokens, x.shape[0], x.device)
        j = column[iv.latent]
        touched[mask, j] = True
        if iv.mode == "pin":
            edited[mask, j] = iv.value
        elif iv.mode == "nudge":
            edited[mask, j] += iv.value
        else:
            edited[mask, j] *= iv.value
    if value_bound is not None:
        check_edit_bound(edited, touched, ids, interventions, value_bound)

    w_edit = sae.W_dec[index]
    if pre_zero:
        new_recon = edited @ w_edit + sae.b_dec
        output = x - decode_latents(sae, latents) + new_recon if use_error_term else new_recon
    else:
        delta = (edited - current) @ w_edit
        output = x + delta if use_error_term else decode_latents(sae, latents) + delta

    before = [current[touched[:, j], j].mean().item() for j in range(len(ids))]
    after = [edited[touched[:, j], j].mean().item() for j in range(len(ids))]
    return Edit(output=output, latents=ids, before=before, after=after)


def check_edit_bound(edited: Tensor, touched: Tensor, ids: list[int], interventions: list[Intervention],
                     value_bound: float) -> None:
    """Raise InterventionError if an edited latent value [T, len(ids)] is non-finite or beyond ±value_bound."""
    bad = touched & ~(edited.isfinite() & (edited.abs() <= value_bound))
    if not bad.any():
        return
    j = int(bad.any(dim=0).nonzero()[0])
    token = int(bad[:, j].nonzero()[0])
    culprits = [i for i, iv in enumerate(interventions) if iv.latent == ids[j]]
    raise InterventionError(
        f"interventions {culprits} compose to {edited[token, j].item():g} for latent {ids[j]} on token {token}, "
        f"beyond the bound {value_bound:g}", "interventions")


def reconstruction_stats(sae: SAE, x: Tensor, latents: Tensor) -> ReconstructionStats:
    """L0 (mean active latents per token) and FVU over one image's tokens, of the unedited encode."""
    x = x.float()
    residual = x - decode_latents(sae, latents)
    variance = (x - x.mean(dim=0)).pow(2).sum()
    return ReconstructionStats(
        l0=latents.ne(0).sum(dim=-1).float().mean().item(),
        fvu=(residual.pow(2).sum() / variance.clamp_min(1e-12)).item(),
    )
