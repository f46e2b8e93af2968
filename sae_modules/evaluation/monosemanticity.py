"""The monosemanticity score (MS) of every latent, exact and linear in the number of images.

MS_k = Σ_{n<m} ã_n ã_m s_nm / Σ_{n<m} ã_n ã_m, with ã the latent's activations min-max normalised
over the N images and s the cosine similarity of the images' embeddings. With unit embeddings ê,
Σ_{n<m} ã_n ã_m s_nm = (‖Σ_n ã_n ê_n‖² − Σ_n ã_n²) / 2 and Σ_{n<m} ã_n ã_m = ((Σ_n ã_n)² − Σ_n ã_n²) / 2,
so one streaming pass accumulates Σ ã ê ([F, D]), Σ ã and Σ ã², and the N x N similarity matrix is
never formed. Both differences cancel badly for latents that fire on few images, so the
accumulation runs in float64. A latent with no spread, or whose normalised activations sit on a
single image (zero pair weight), has no score: NaN, left out of every mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_summary import LatentSummary, summarize_latents

DEFAULT_MEMORY_BYTES = 4 << 30
_LATENT_CHUNK = 8192
_ZERO_WEIGHT = 1e-12


def monosemanticity_scores(batches: Iterable[tuple[Tensor, Tensor | None]], lo: Tensor, hi: Tensor, *,
                           memory_bytes: int = DEFAULT_MEMORY_BYTES, device: str | torch.device = "cpu") -> Tensor:
    """MS of every latent [F] (float64, NaN where undefined), given each latent's range over the images.

    `batches` yields (activations [n, F], embeddings [n, D]) in a fixed image order and is read once
    per block of latents whose [block, D] float64 accumulator fits in `memory_bytes` (one block, so one
    read, for 65,536 latents x 1,024 dims at the default 4 GiB).
    """
    n_latents = lo.numel()
    device = torch.device(device)
    lo64, span = lo.to(device, torch.float64), (hi - lo).to(device, torch.float64)
    live = span > 0
    span = torch.where(live, span, torch.ones_like(span))
    scores = torch.full((n_latents,), math.nan, dtype=torch.float64)
    start = 0
    while start < n_latents:
        sums = _accumulate(batches, lo64, span, start, n_latents, memory_bytes, device)
        stop = start + sums[0].shape[0]
        weighted, s1, s2 = sums
        pair_sim = (weighted * weighted).sum(dim=1) - s2
        pair_weight = s1 * s1 - s2
        defined = live[start:stop] & (pair_weight > _ZERO_WEIGHT * s1 * s1)
        block = torch.where(defined, pair_sim / torch.where(defined, pair_weight, 1.0), math.nan)
        scores[start:stop] = block.cpu()
        start = stop
    return scores


def _accumulate(batches: Iterable[tuple[Tensor, Tensor | None]], lo: Tensor, span: Tensor, start: int,
                n_latents: int, memory_bytes: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """One read of the images: Σ ã ê, Σ ã, Σ ã² for the latents [start, start + block)."""
    weighted = s1 = s2 = None
    stop = n_latents
    image = 0
    for acts, emb in batches:
        if emb is None:
            raise EvaluationError("the monosemanticity score needs image embeddings", "embeddings")
        if acts.shape[0] != emb.shape[0]:
            raise EvaluationError(f"a batch pairs {acts.shape[0]} activation rows with {emb.shape[0]} embeddings",
                                  "embeddings")
        unit = _unit_rows(emb.to(device, torch.float64), image)
        if weighted is None:
            d_embed = unit.shape[1]
            stop = min(n_latents, start + max(1, memory_bytes // (8 * (d_embed + 2))))
            weighted = torch.zeros(stop - start, d_embed, dtype=torch.float64, device=device)
            s1 = torch.zeros(stop - start, dtype=torch.float64, device=device)
            s2 = torch.zeros_like(s1)
        elif unit.shape[1] != weighted.shape[1]:
            raise EvaluationError(f"embeddings change width from {weighted.shape[1]} to {unit.shape[1]}", "embeddings")
        for c0 in range(start, stop, _LATENT_CHUNK):
            c1 = min(stop, c0 + _LATENT_CHUNK)
            norm = acts[:, c0:c1].to(device, torch.float64, copy=True).sub_(lo[c0:c1]).div_(span[c0:c1])
            weighted[c0 - start:c1 - start].addmm_(norm.T, unit)
            s1[c0 - start:c1 - start] += norm.sum(dim=0)
            s2[c0 - start:c1 - start] += torch.einsum("ij,ij->j", norm, norm)
        image += acts.shape[0]
    if weighted is None:
        raise EvaluationError("no images: the activations are empty", "activations")
    return weighted, s1, s2


def _unit_rows(emb: Tensor, first_image: int) -> Tensor:
    norms = emb.norm(dim=1, keepdim=True)
    bad = (~torch.isfinite(norms) | (norms == 0)).squeeze(1).nonzero()
    if len(bad):
        raise EvaluationError(f"the embedding of image {first_image + int(bad[0])} is zero or not finite: "
                              "its cosine similarity is undefined", "embeddings")
    return emb / norms


class MSReport(BaseModel):
    """What `vlm-steer evaluate ms` writes: every latent's score (null when undefined) and the summary."""

    ms: list[float | None] = Field(description="Per-latent MS; null for dead and single-image latents.")
    mean: float | None = Field(description="Mean MS over latents that have one.")
    std: float | None = Field(description="Standard deviation (unbiased) over the same latents.")
    n_live: int = Field(description="Latents with a score.")
    n_latents: int
    n_images: int
    best: list[tuple[int, float]] = Field(default_factory=list, description="(latent, MS), highest first.")
    worst: list[tuple[int, float]] = Field(default_factory=list, description="(latent, MS), lowest first.")


def ms_report(scores: Tensor, n_images: int, extremes: int = 10) -> MSReport:
    """Summarise per-latent scores the way the paper reports them (mean ± std over live latents)."""
    defined = ~torch.isnan(scores)
    values = scores[defined]
    index = defined.nonzero().squeeze(1)
    n_live = int(defined.sum())
    order = torch.argsort(values, descending=True)
    best = [(int(index[i]), float(values[i])) for i in order[:extremes]]
    worst = [(int(index[i]), float(values[i])) for i in order.flip(0)[:extremes]]
    return MSReport(
        ms=[None if math.isnan(v) else v for v in scores.tolist()],
        mean=float(values.mean()) if n_live else None,
        std=float(values.std()) if n_live > 1 else None,
        n_live=n_live, n_latents=scores.numel(), n_images=n_images, best=best, worst=worst,
    )


def monosemanticity(batches: Iterable[tuple[Tensor, Tensor | None]], n_latents: int, *, top_k: int = 16,
                    memory_bytes: int = DEFAULT_MEMORY_BYTES,
                    device: str | torch.device = "cpu") -> tuple[LatentSummary, Tensor]:
    """Both passes: the latent summary (range, firing, top images) and then the scores."""
    summary = summarize_latents(batches, n_latents, top_k)
    return summary, monosemanticity_scores(batches, summary.lo, summary.hi, memory_bytes=memory_bytes, device=device)
