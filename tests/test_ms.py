"""The monosemanticity score equals the paper's pairwise definition, streamed or not."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_summary import summarize_latents
from sae_modules.evaluation.monosemanticity import monosemanticity, monosemanticity_scores, ms_report
from sae_modules.evaluation.sources import SafetensorsBatches, TensorBatches


def pairwise_ms(acts: torch.Tensor, emb: torch.Tensor) -> list[float]:
    """The definition, literally: every pair n < m, cosine of the raw embeddings, min-max weights."""
    n_images, n_latents = acts.shape
    acts, emb = acts.double(), emb.double()
    sim = [[float(torch.nn.functional.cosine_similarity(emb[n], emb[m], dim=0)) for m in range(n_images)]
           for n in range(n_images)]
    scores = []
    for k in range(n_latents):
        a = acts[:, k]
        lo, hi = float(a.min()), float(a.max())
        if hi == lo:
            scores.append(math.nan)
            continue
        w = [(float(x) - lo) / (hi - lo) for x in a]
        num = den = 0.0
        for n in range(n_images):
            for m in range(n + 1, n_images):
                num += w[n] * w[m] * sim[n][m]
                den += w[n] * w[m]
        scores.append(num / den if den > 0 else math.nan)
    return scores


def _data(seed: int = 0, n_images: int = 40, n_latents: int = 12, d: int = 6):
    gen = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n_images, n_latents, generator=gen))
    acts[:, 0] = 0.0                       # dead: never fires
    acts[:, 1] = 0.0
    acts[7, 1] = 2.5                       # fires on a single image: no pairs
    acts[:, 2] = 3.0                       # constant: no spread
    acts[:, 3] = torch.randn(n_images, generator=gen) * 4 - 10   # raw-neuron-like: negative, offset
    emb = torch.randn(n_images, d, generator=gen) * 3
    return acts, emb


def test_matches_pairwise_definition_with_dead_and_single_image_latents():
    acts, emb = _data()
    _, scores = monosemanticity(TensorBatches(acts, emb, batch_size=7), acts.shape[1])
    expected = torch.tensor(pairwise_ms(acts, emb), dtype=torch.float64)
    assert torch.isnan(scores[:3]).all() and torch.isnan(expected[:3]).all()
    assert torch.allclose(scores[3:], expected[3:], atol=1e-5, rtol=0)


def test_nearly_single_image_latent_keeps_float64_precision():
    acts, emb = _data(seed=1)
    acts[:, 4] = 0.0
    acts[3, 4], acts[9, 4] = 1.0, 1e-4     # the pair weight is 1e-4 of the squared sum
    _, scores = monosemanticity(TensorBatches(acts, emb, batch_size=5), acts.shape[1])
    cos = float(torch.nn.functional.cosine_similarity(emb[3].double(), emb[9].double(), dim=0))
    assert scores[4].item() == pytest.approx(cos, abs=1e-9)


def test_cluster_latent_scores_higher_than_spread_latent():
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 16, generator=gen)
    cluster = torch.arange(200) % 4
    emb = centres[cluster] + 0.2 * torch.randn(200, 16, generator=gen)
    acts = torch.zeros(200, 2)
    acts[:, 0] = (cluster == 1).float() * torch.rand(200, generator=gen)   # fires on one cluster only
    acts[:, 1] = torch.rand(200, generator=gen)                            # fires everywhere
    _, scores = monosemanticity(TensorBatches(acts, emb), 2)
    assert scores[0] > 0.9 and scores[1] < 0.5


def test_streamed_and_chunked_equal_one_shot(tmp_path):
    acts, emb = _data(seed=3, n_images=64, n_latents=20, d=5)
    _, one_shot = monosemanticity(TensorBatches(acts, emb, batch_size=64), 20)
    save_file({"activations": acts[:30].contiguous()}, tmp_path / "a0.safetensors")
    save_file({"activations": acts[30:].contiguous()}, tmp_path / "a1.safetensors")
    save_file({"embeddings": emb}, tmp_path / "e.safetensors")
    files = SafetensorsBatches([tmp_path / "a0.safetensors", tmp_path / "a1.safetensors"],
                               tmp_path / "e.safetensors", batch_size=9)
    summary = summarize_latents(files, 20)
    blocked = monosemanticity_scores(files, summary.lo, summary.hi, memory_bytes=8 * 7 * 3)   # 3 latents a block
    assert torch.equal(torch.isnan(one_shot), torch.isnan(blocked))
    live = ~torch.isnan(one_shot)
    assert torch.allclose(one_shot[live], blocked[live], atol=1e-12, rtol=0)


def test_report_summarises_live_latents_only():
    scores = torch.tensor([math.nan, 0.2, 0.8, math.nan, 0.5], dtype=torch.float64)
    report = ms_report(scores, n_images=10, extremes=2)
    assert report.ms == [None, 0.2, 0.8, None, 0.5]
    assert report.n_live == 3
    assert report.mean == pytest.approx(0.5)
    assert report.std == pytest.approx(0.3)
    assert report.best == [(2, 0.8), (4, 0.5)] and report.worst == [(1, 0.2), (4, 0.5)]


def test_summary_tracks_range_firing_and_top_images():
    acts = torch.tensor([[0.0, 1.0], [3.0, 0.0], [1.0, 2.0], [2.0, 0.5]])
    summary = summarize_latents(TensorBatches(acts, None, batch_size=3), 2, top_k=2)
    assert summary.lo.tolist() == [0.0, 0.0] and summary.hi.tolist() == [3.0, 2.0]
    assert summary.fires.tolist() == [3, 3]
    assert summary.top_images.tolist() == [[1, 3], [2, 0]]
    bare = summarize_latents(TensorBatches(acts, None, batch_size=3), 2, top_k=0)
    assert torch.equal(bare.lo, summary.lo) and torch.equal(bare.fires, summary.fires)
    assert bare.top_images.shape == (2, 0) and bare.n_images == 4


@pytest.mark.parametrize(("emb", "field"), [
    (torch.zeros(4, 3), "embeddings"),
    (torch.ones(5, 3), "embeddings"),
])
def test_bad_embeddings_raise_named_errors(emb, field):
    acts = torch.rand(4, 2)
    with pytest.raises(EvaluationError) as err:
        monosemanticity(TensorBatches(acts, emb), 2)
    assert err.value.field == field


def test_non_finite_activations_raise_named_error():
    acts = torch.rand(4, 2)
    acts[2, 1] = math.nan
    with pytest.raises(EvaluationError, match="NaN") as err:
        monosemanticity(TensorBatches(acts, torch.rand(4, 3)), 2)
    assert err.value.field == "activations"


def test_missing_tensor_in_file_names_it(tmp_path):
    save_file({"acts": torch.rand(3, 2)}, tmp_path / "a.safetensors")
    with pytest.raises(EvaluationError, match="no tensor 'activations'"):
        SafetensorsBatches([tmp_path / "a.safetensors"], None)
