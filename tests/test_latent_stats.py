"""Latent statistics: equal to a one-shot numpy computation, stored beside the checkpoint, stale ones detected."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_modules.activations.shards import ShardManifest, ShardWriter
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_stats import (
    STATS_JSON,
    STATS_TENSORS,
    FiringQuantile,
    LatentStatsAccumulator,
    check_fresh,
    compute_latent_stats,
    load_latent_stats,
    sae_digest,
    save_latent_stats,
)
from sae_modules.formats.native import save_sae
from sae_modules.saes import SAEConfig, build_sae

D_IN, N_LATENTS, TOKENS_PER_IMAGE, N_IMAGES = 16, 24, 5, 60


def reference(latents: np.ndarray, image_index: np.ndarray, top_k: int) -> dict:
    """The figures computed directly on the whole matrix: per latent, over its firing entries."""
    out = {"fire_count": [], "mean": [], "max": [], "p99": [], "top": []}
    images = np.unique(image_index)
    per_image = np.stack([latents[image_index == i].max(axis=0) for i in images])
    for k in range(latents.shape[1]):
        firing = latents[:, k][latents[:, k] > 0]
        out["fire_count"].append(len(firing))
        out["mean"].append(firing.mean() if len(firing) else 0.0)
        out["max"].append(firing.max() if len(firing) else 0.0)
        out["p99"].append(np.quantile(firing, 0.99, method="inverted_cdf") if len(firing) else 0.0)
        order = np.argsort(-per_image[:, k], kind="stable")[:top_k]
        out["top"].append({int(images[i]): float(per_image[i, k]) for i in order if per_image[i, k] > 0})
    return out


def test_quantile_sketch_is_within_its_relative_error() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.exp(torch.randn(3, 5000, generator=gen, dtype=torch.float64) * 3)   # ~6 orders of magnitude
    values = values.clamp(1e-4, 1e5)
    sketch = FiringQuantile(3, relative_error=0.01)
    for chunk in values.T.split(700):
        sketch.add(torch.arange(3).repeat(len(chunk)), chunk.reshape(-1))
    for q in (0.5, 0.9, 0.99):
        exact = np.quantile(values.numpy(), q, axis=1, method="inverted_cdf")
        estimate = sketch.quantile(q).numpy()
        assert np.all(np.abs(estimate - exact) <= 0.01 * exact + 1e-12), (q, estimate, exact)


def test_accumulator_equals_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(1)
    dense = torch.rand(N_IMAGES * TOKENS_PER_IMAGE, N_LATENTS, generator=gen) * 10
    dense[torch.rand(dense.shape, generator=gen) < 0.8] = 0.0      # sparse, like SAE latents
    dense[:, 3] = 0.0                                               # a dead latent
    dense[:, 5] = 0.0
    dense[7, 5] = 2.5                                               # fires once
    image_index = torch.arange(N_IMAGES).repeat_interleave(TOKENS_PER_IMAGE) * 2   # ids need not be contiguous
    acc = LatentStatsAccumulator(N_LATENTS, top_k=4)
    for rows in torch.arange(len(dense)).split(13):                 # batches cut images in two
        acc.update(dense[rows], image_index[rows])
    names = [f"img{i}.png" for i in range(2 * N_IMAGES)]
    stats = acc.result(names, sae_sha256="x", activations={})
    want = reference(dense.numpy(), image_index.numpy(), top_k=4)

    assert stats.fire_count.tolist() == want["fire_count"]
    assert stats.info.n_vectors == len(dense) and stats.info.n_images == N_IMAGES
    np.testing.assert_allclose(stats.mean.numpy(), want["mean"], rtol=1e-6)
    np.testing.assert_allclose(stats.max.numpy(), want["max"], rtol=1e-6)
    p99 = np.array(want["p99"])
    assert np.all(np.abs(stats.p99.numpy() - p99) <= 0.01 * p99 + 1e-6)
    for k in range(N_LATENTS):
        got = {int(name[3:-4]): value for name, value in stats.top(k)}
        assert got == pytest.approx(want["top"][k]), k
    assert stats.top(3) == [] and stats.top(5) == [("img2.png", 2.5)]
    assert stats.frequency[0] == pytest.approx(want["fire_count"][0] / len(dense))


def test_vectors_out_of_image_order_are_refused() -> None:
    acc = LatentStatsAccumulator(4)
    acc.update(torch.ones(3, 4), torch.tensor([0, 0, 1]))
    acc.update(torch.ones(2, 4), torch.tensor([1, 2]))
    with pytest.raises(EvaluationError, match="image order"):
        acc.update(torch.ones(2, 4), torch.tensor([1, 3]))


@pytest.fixture
def sae_and_shards(tmp_path):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=D_IN, n_latents=N_LATENTS, k=4, threshold=0.2))
    sae_dir = save_sae(sae, tmp_path / "sae")
    x = torch.randn(N_IMAGES * TOKENS_PER_IMAGE, D_IN)
    image_index = torch.arange(N_IMAGES).repeat_interleave(TOKENS_PER_IMAGE)
    manifest = ShardManifest(model="tiny", layer=1, tokens="random:5", d_in=D_IN,
                             images=[f"cls{i % 3}/{i:03d}.png" for i in range(N_IMAGES)])
    writer = ShardWriter(tmp_path / "acts", manifest, shard_size=37)
    writer.add(x, image_index, torch.ones_like(image_index))
    writer.finish()
    return sae, sae_dir, tmp_path / "acts", x, image_index


def test_stats_from_shards_saved_beside_the_checkpoint(sae_and_shards) -> None:
    sae, sae_dir, shards, x, image_index = sae_and_shards
    stats = compute_latent_stats(sae, sae_dir, shards, top_k=3, images_root="/data/imgs", batch_size=16)
    save_latent_stats(stats, sae_dir)
    loaded = load_latent_stats(sae_dir)
    with torch.no_grad():
        want = reference(sae.encode(x).numpy(), image_index.numpy(), top_k=3)
    assert loaded.fire_count.tolist() == want["fire_count"]
    np.testing.assert_allclose(loaded.max.numpy(), want["max"], rtol=1e-6)
    np.testing.assert_allclose(loaded.mean.numpy(), want["mean"], rtol=1e-5)
    best = max(range(N_LATENTS), key=lambda k: want["fire_count"][k])
    assert [name for name, _ in loaded.top(best)] == [f"cls{i % 3}/{i:03d}.png" for i in want["top"][best]]
    info = json.loads((sae_dir / STATS_JSON).read_text())
    assert info["format"] == "vlm-steer-latent-stats" and info["format_version"] == 1
    assert info["sae_sha256"] == sae_digest(sae_dir) and info["images_root"] == "/data/imgs"
    assert info["activations"]["tokens"] == "random:5" and info["n_vectors"] == len(x)
    check_fresh(loaded.info.sae_sha256, sae_dir)
    # Saving the checkpoint again (a rerun of training) replaces the folder, statistics included.
    save_sae(sae, sae_dir)
    assert not (sae_dir / STATS_JSON).exists() and not (sae_dir / STATS_TENSORS).exists()


def test_stale_or_corrupt_statistics_are_detected(sae_and_shards) -> None:
    sae, sae_dir, shards, *_ = sae_and_shards
    save_latent_stats(compute_latent_stats(sae, sae_dir, shards, max_vectors=50), sae_dir)
    assert load_latent_stats(sae_dir).info.n_vectors == 50
    recorded = load_latent_stats(sae_dir).info.sae_sha256
    sae.cfg = sae.cfg.model_copy(update={"threshold": 0.5})       # same weights, another threshold
    save_sae(sae, sae_dir)
    with pytest.raises(EvaluationError, match="another version"):
        check_fresh(recorded, sae_dir)
    save_latent_stats(compute_latent_stats(sae, sae_dir, shards), sae_dir)
    data = bytearray((sae_dir / STATS_TENSORS).read_bytes())
    data[-3] ^= 0xFF
    (sae_dir / STATS_TENSORS).write_bytes(bytes(data))
    with pytest.raises(EvaluationError, match="sha256"):
        load_latent_stats(sae_dir)
    (sae_dir / STATS_JSON).unlink()
    with pytest.raises(EvaluationError, match="evaluate stats"):
        load_latent_stats(sae_dir)


def test_shards_of_another_width_are_refused(sae_and_shards, tmp_path) -> None:
    _, sae_dir, shards, *_ = sae_and_shards
    other = build_sae(SAEConfig(architecture="batchtopk", d_in=D_IN + 1, n_latents=8, k=2, threshold=0.1))
    with pytest.raises(EvaluationError, match="d_in"):
        compute_latent_stats(other, sae_dir, shards)
