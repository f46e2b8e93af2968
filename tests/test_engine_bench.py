"""The overhead benchmark on tiny shapes: its SAE fires as the benchmark says, and it runs."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_intervention import TARGET_L0, Shapes, build_bench_sae, build_model, measure
from service.engine.steerer import VisionSteerer

TINY = Shapes(image_size=56, vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                                     "num_attention_heads": 2}, text_hidden=64, n_latents=512)


def test_bench_sae_fires_about_target_l0_per_token():
    model = build_model(TINY, torch.device("cpu"))
    steerer = VisionSteerer(model, {})
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    sae = build_bench_sae(steerer, pixels, TINY, layer=2)
    hidden = steerer.block_output(pixels, 2)[0]
    l0 = (sae.encode(hidden) != 0).sum(-1).float().mean().item()
    assert l0 == pytest.approx(TARGET_L0, rel=0.5)


def test_benchmark_runs_end_to_end_on_tiny_shapes():
    """Keeps `make bench` from breaking unnoticed; the figures themselves come from the real shapes."""
    rows = measure(TINY, (1, 2), repeats=1, layer=2, device=torch.device("cpu"))
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["fast_ratio"] == pytest.approx(row["fast_s"] / row["baseline_s"])
        assert row["paper_ratio"] == pytest.approx(row["paper_s"] / row["baseline_s"])
