"""Tiny activation shards for the training tests: sparse sums of a hidden dictionary."""

from __future__ import annotations

from pathlib import Path

import torch

from sae_modules.activations.shards import ShardManifest, ShardWriter

D_IN = 16
N_FEATURES = 16


def sparse_activations(n: int, seed: int = 0, scale: float = 50.0) -> torch.Tensor:
    """Each vector is 2 of 16 unit directions with positive weights, plus an offset, times `scale`.

    The large scale makes the input-scale folding matter: an SAE that forgot it would fail on raw inputs.
    """
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(N_FEATURES, D_IN, generator=torch.Generator().manual_seed(1234))
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(N_FEATURES, generator=g)[:2] for _ in range(n)])
    weights = torch.rand(n, 2, generator=g) + 0.5
    x = (weights[..., None] * dictionary[idx]).sum(1) + 0.3
    return x * scale


def write_shards(directory: Path, acts: torch.Tensor, shard_size: int, layer: int = -2) -> ShardManifest:
    """Write `acts` as a complete shard directory (one 'image' per 4 vectors)."""
    n = len(acts)
    images = [f"img{i}.png" for i in range((n + 3) // 4)]
    manifest = ShardManifest(
        model="tiny/clip", layer=layer, tokens="random:4", d_in=acts.shape[1], images=images
    )
    writer = ShardWriter(directory, manifest, shard_size=shard_size)
    writer.add(acts, torch.arange(n) // 4, torch.arange(n) % 4)
    return writer.finish()
