"""Streaming reconstruction metrics against a one-shot numpy computation over the whole set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_modules.metrics import MetricsInputError, ReconstructionMetrics
from sae_modules.saes import SAEConfig, build_sae

N_LATENTS = 12


def one_shot(x: np.ndarray, x_hat: np.ndarray, f: np.ndarray, cutoff: float) -> dict[str, float]:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    sse = ((x - x_hat) ** 2).sum()
    fires = (f != 0).sum(0)
    return {
        "fvu": sse / ((x - x.mean(0)) ** 2).sum(),
        "mse": sse / x.size,
        "l0": (f != 0).sum(1).mean(),
        "dead_fraction": (fires == 0).mean(),
        "dense_fraction": (fires > cutoff * len(x)).mean(),
        "n_vectors": len(x),
    }


def sample(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # A large offset and small spread: where Σx² - n·mean² would lose the variance in float32.
    x = 1000 + torch.randn(n, 6, generator=gen)
    x_hat = x + 0.3 * torch.randn(n, 6, generator=gen)
    f = torch.rand(n, N_LATENTS, generator=gen).relu_() * (torch.rand(n, N_LATENTS, generator=gen) < 0.2)
    f[:, 0] = 0  # one dead latent
    f[:, 1] = 1  # one dense latent
    f[: n // 20, 2] = 1  # fires on 5%: below a 10% cutoff, above a 1% one
    return x, x_hat, f


@pytest.mark.parametrize("cutoff", [0.1, 0.01])
@pytest.mark.parametrize("batch", [1, 7, 100, 1000])
def test_streaming_equals_one_shot(batch: int, cutoff: float) -> None:
    x, x_hat, f = sample(1000)
    metrics = ReconstructionMetrics(N_LATENTS, dense_cutoff=cutoff)
    for start in range(0, len(x), batch):
        metrics.update(x[start : start + batch], x_hat[start : start + batch], f[start : start + batch])
    got, want = metrics.compute(), one_shot(x.numpy(), x_hat.numpy(), f.numpy(), cutoff)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_sparse_forward_latents_and_leading_dims_count_the_same() -> None:
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="topk", d_in=8, n_latents=N_LATENTS, k=3))
    x = torch.randn(4, 5, 8)
    out = sae(x)
    sparse, dense = ReconstructionMetrics(N_LATENTS), ReconstructionMetrics(N_LATENTS)
    sparse.update(x, out.recon, out.latents)
    dense.update(x, out.recon, out.latents.to_dense().view(4, 5, N_LATENTS))
    assert sparse.compute() == dense.compute()
    assert sparse.compute()["l0"] == pytest.approx(3.0)


def test_bad_input_is_named() -> None:
    metrics = ReconstructionMetrics(N_LATENTS)
    with pytest.raises(MetricsInputError, match="update"):
        metrics.compute()
    with pytest.raises(MetricsInputError, match="x_hat"):
        metrics.update(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3, N_LATENTS))
    with pytest.raises(MetricsInputError, match="n_latents=12"):
        metrics.update(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(MetricsInputError, match="dense_cutoff"):
        ReconstructionMetrics(N_LATENTS, dense_cutoff=1.5)
