"""Reconstruction and sparsity of an SAE on activation shards: FVU, L0, dead and dense latents.

The accumulation is `sae_modules.metrics.ReconstructionMetrics` (streaming, float64); this module
only feeds it the shards through the SAE's inference path (the learned threshold, not batch top-k).
"""

from __future__ import annotations

import os

import torch

from sae_modules.activations.shards import ShardError, iter_shards
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.sources import shard_manifest_for
from sae_modules.metrics import ReconstructionMetrics
from sae_modules.saes.base import SAE


@torch.no_grad()
def reconstruction_metrics(sae: SAE, shards: str | os.PathLike, *, max_vectors: int | None = None,
                           batch_size: int = 4096, device: str | torch.device = "cpu") -> dict[str, float]:
    """FVU, MSE, L0, dead and dense fractions over the shard directory's vectors (up to max_vectors)."""
    shard_manifest_for(shards, sae.d_in, "shards")
    sae = sae.to(device).eval()
    dtype = next(sae.parameters()).dtype
    metrics = ReconstructionMetrics(sae.n_latents)
    seen = 0
    try:
        for shard in iter_shards(shards):
            for x in shard["activations"].split(batch_size):
                if max_vectors is not None:
                    x = x[:max_vectors - seen]
                if not len(x):
                    break
                x = x.to(device, dtype)
                latents = sae.encode(x)
                metrics.update(x, sae.decode(latents), latents)
                seen += len(x)
            if max_vectors is not None and seen >= max_vectors:
                break
    except ShardError as err:
        raise EvaluationError(str(err), "shards") from None
    if seen == 0:
        raise EvaluationError(f"{shards} holds no activation vectors", "shards")
    return metrics.compute()
