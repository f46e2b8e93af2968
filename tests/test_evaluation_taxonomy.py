"""Taxonomy depth: LCA depths of top images, hand-counted; loaders for folders and CSV."""

from __future__ import annotations

import math

import pytest
import torch

from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_summary import summarize_latents
from sae_modules.evaluation.sources import TensorBatches
from sae_modules.evaluation.taxonomy_depth import (
    by_level,
    csv_taxonomy,
    folder_taxonomy,
    latent_depths,
    lca_depth,
)

PATHS = [
    ("animal", "bird", "owl"),      # 0
    ("animal", "bird", "owl"),      # 1
    ("animal", "bird", "crow"),     # 2
    ("animal", "fish", "cod"),      # 3
    ("plant", "tree", "oak"),       # 4
    ("plant", "tree", "elm"),       # 5
]


def test_lca_depth_counts_shared_prefix():
    assert lca_depth(PATHS[0], PATHS[1]) == 3
    assert lca_depth(PATHS[0], PATHS[2]) == 2
    assert lca_depth(PATHS[0], PATHS[3]) == 1
    assert lca_depth(PATHS[0], PATHS[4]) == 0


def test_depths_match_a_hand_count():
    # latent 0 tops images 0,1,2 (pairs: 3, 2, 2 -> 7/3); latent 1 tops 2,3,4 (1, 0, 0 -> 1/3);
    # latent 2 fires on only two images, so with k = 3 it is left out.
    acts = torch.zeros(6, 3)
    acts[[0, 1, 2], 0] = torch.tensor([3.0, 2.0, 1.0])
    acts[5, 0] = 0.5
    acts[[2, 3, 4], 1] = torch.tensor([1.0, 2.0, 3.0])
    acts[[4, 5], 2] = 1.0
    summary = summarize_latents(TensorBatches(acts, None, batch_size=4), 3, top_k=3)
    depths = latent_depths(summary.top_images, summary.top_values, PATHS)
    assert depths[0].item() == pytest.approx(7 / 3)
    assert depths[1].item() == pytest.approx(1 / 3)
    assert math.isnan(depths[2].item())


def test_by_level_averages_each_matryoshka_group():
    depths = torch.tensor([3.0, 1.0, math.nan, 0.4, 0.6], dtype=torch.float64)
    ms = torch.tensor([0.9, 0.7, 0.5, math.nan, 0.1], dtype=torch.float64)
    rows = by_level(depths, ms, [2, 3])
    assert [(r.first_latent, r.n_latents, r.n_scored) for r in rows] == [(0, 2, 2), (2, 3, 2)]
    assert rows[0].depth == pytest.approx(2.0) and rows[0].ms == pytest.approx(0.8)
    assert rows[1].depth == pytest.approx(0.5) and rows[1].ms == pytest.approx(0.3)
    assert rows[1].depth_rounded == pytest.approx(0.5)    # round(0.4) = 0, round(0.6) = 1
    with pytest.raises(EvaluationError, match="do not sum"):
        by_level(depths, ms, [2, 2])


def test_folder_taxonomy_follows_inaturalist_layout():
    images = ["train/00012_Animalia_Chordata_Aves/a.jpg", "train/Plantae_Tracheophyta/b.jpg"]
    assert folder_taxonomy(images) == [("Animalia", "Chordata", "Aves"), ("Plantae", "Tracheophyta")]
    with pytest.raises(EvaluationError, match="class folder"):
        folder_taxonomy(["loose.jpg"])


def test_csv_taxonomy_reads_path_or_level_columns(tmp_path):
    (tmp_path / "p.csv").write_text("image,path\na.png,animal/bird\nb.png,plant/tree\n")
    assert csv_taxonomy(tmp_path / "p.csv", ["b.png", "a.png"]) == [("plant", "tree"), ("animal", "bird")]
    (tmp_path / "l.csv").write_text("image,kingdom,class\na.png,animal,bird\n")
    assert csv_taxonomy(tmp_path / "l.csv", ["a.png"]) == [("animal", "bird")]
    with pytest.raises(EvaluationError, match="no path for 1 images") as err:
        csv_taxonomy(tmp_path / "l.csv", ["a.png", "c.png"])
    assert err.value.field == "taxonomy"
