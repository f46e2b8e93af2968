"""The taxa tower: the build runs end to end and loads through the real tower loader; the shipped tower's
recorded accuracies are recomputed from its weights and heads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionModel

from sae_modules.activations.towers import load_tower
from sae_modules.taxa import TAXA_MANIFEST, TAXA_TOWER_DIR
from sae_modules.taxa.build import build
from sae_modules.taxa.tower import TowerRecipe, held_out_accuracy, load_heads, load_world
from sae_modules.taxa.world import TaxaWorld


def test_a_tiny_build_writes_a_tower_that_vlm_steer_loads(tmp_path) -> None:
    recipe = TowerRecipe.tiny()
    manifest = build(tmp_path, recipe, progress=False)
    assert json.loads((tmp_path / "MANIFEST.json").read_text()) == json.loads(json.dumps(manifest))
    assert set(manifest["figures"]) == {"loss", "family_accuracy", "genus_accuracy", "species_accuracy"}
    tower = load_tower(str(tmp_path / "tower"), device="cpu")
    images = [image for image, _ in TaxaWorld().images(3, seed="tiny")]
    hidden = tower.layer_output(tower.preprocess(images), 1)
    assert hidden.shape == (3, 1 + 36, recipe.hidden_size) and torch.isfinite(hidden).all()
    assert load_world(tmp_path / "tower") == recipe.taxa_world()
    heads = load_heads(tmp_path / "tower")
    assert [h.out_features for h in heads] == [4, 16, 96]


def test_the_shipped_tower_reproduces_its_recorded_accuracy_and_knows_every_level() -> None:
    manifest = json.loads(TAXA_MANIFEST.read_text())
    recipe = TowerRecipe(**manifest["recipe"])
    assert load_world(TAXA_TOWER_DIR) == recipe.taxa_world() == TaxaWorld()
    tower = CLIPVisionModel.from_pretrained(TAXA_TOWER_DIR)
    figures = held_out_accuracy(tower, load_heads(TAXA_TOWER_DIR), recipe)
    for level in ("family", "genus", "species"):
        assert figures[f"{level}_accuracy"] == pytest.approx(manifest["figures"][f"{level}_accuracy"], abs=2e-3)
        assert figures[f"{level}_accuracy"] >= 0.95
