"""The overhead benchmark on tiny shapes: its SAE fires as the benchmark says, and it runs."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_intervention import (
    TARGET_L0,
    Shapes,
    bench_runs,
    build_bench_sae,
    build_model,
    build_steerer,
    measure,
)
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


def test_benchmark_times_real_edits_on_tiny_shapes():
    """The timed calls do what the benchmark's table says: both modes edit the image features (a no-op
    edit would make the ratios meaningless), and the two modes differ (paper mode drops the SAE error)."""
    runs = bench_runs(build_steerer(TINY, layer=2, device=torch.device("cpu")), 2)
    with torch.no_grad():
        baseline = runs["baseline"]()
        baseline = getattr(baseline, "pooler_output", baseline)
        fast, paper = ([item.steered for item in runs[mode]()] for mode in ("fast", "paper"))
    for i in range(2):
        assert fast[i].shape == paper[i].shape == baseline[i].shape
        assert not torch.allclose(fast[i], baseline[i], atol=1e-4)
        assert not torch.allclose(fast[i], paper[i], atol=1e-4)
    rows = measure(TINY, (1, 2), repeats=1, layer=2, device=torch.device("cpu"))
    assert [row["batch"] for row in rows] == [1, 2]
    assert all(row[f"{name}_s"] > 0 for row in rows for name in ("baseline", "fast", "paper"))
