"""The taxa world: deterministic draws, inherited motifs at per-image saliences, the class-folder layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_modules.activations.images import FolderImages
from sae_modules.evaluation.taxonomy_depth import folder_taxonomy
from sae_modules.taxa.world import TaxaWorld, TaxaWorldError, write_folder


def test_the_same_seed_draws_the_same_images_and_chunks_do_not_change_them() -> None:
    world = TaxaWorld()
    a, sa = world.sample(20, seed="x")
    b, sb = world.sample(20, seed="x")
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, world.sample(20, seed="y")[0])
    pil = [np.asarray(img) for img, _ in world.images(10, seed="z", chunk=3)]
    again = [np.asarray(img) for img, _ in world.images(10, seed="z", chunk=3)]
    assert all(np.array_equal(p, q) for p, q in zip(pil, again)) and pil[0].shape == (48, 48, 3)


def test_an_image_is_its_family_genus_and_species_motifs_at_positive_saliences() -> None:
    """Least squares on all 116 motifs recovers exactly the image's three taxa (noise off, no clipping)."""
    world = TaxaWorld(amplitude=(0.05, 0.04, 0.03), salience_sigma=0.3, noise=0.0)
    pixels, species = world.sample(30, seed="motifs")
    motifs = torch.cat(world.motifs).flatten(1).double()  # [4 + 16 + 96, 3 * 48 * 48]
    assert pixels.min() > 0 and pixels.max() < 1
    coef = torch.linalg.lstsq(motifs.T, (pixels.flatten(1).double() - 0.5).T).solution.T  # [30, 116]
    for row, s in zip(coef, species.tolist()):
        genus = s // world.species_per_genus
        truth = [genus // world.genera_per_family, world.families + genus, world.families + world.n_genera + s]
        assert set(row.abs().topk(3).indices.tolist()) == set(truth)
        assert (row[truth] > 0).all()
        others = torch.ones(len(row), dtype=torch.bool)
        others[truth] = False
        assert row[others].abs().max() < 1e-6


def test_motifs_are_tiles_of_the_patch_size_and_never_shared_across_taxa() -> None:
    world = TaxaWorld()
    motifs = torch.cat(world.motifs)
    assert motifs.shape == (4 + 16 + 96, 3, 48, 48)
    assert torch.equal(motifs[..., :8, :8], motifs[..., 8:16, 40:48])
    unit = torch.nn.functional.normalize(motifs.flatten(1), dim=1)
    cosine = unit @ unit.T - torch.eye(len(unit))
    assert cosine.abs().max() < 0.4


def test_folders_read_back_as_each_images_taxonomy_path(tmp_path) -> None:
    world = TaxaWorld()
    species = write_folder(world, tmp_path, 12, seed="folders")
    source = FolderImages(tmp_path)
    paths = folder_taxonomy(source.ids)
    by_index = {int(i.split("/")[-1].split(".")[0]): p for i, p in zip(source.ids, paths)}
    assert [by_index[i] for i in range(12)] == [world.path(s) for s in species]
    assert all(len(p) == 3 and p[1].startswith("g") for p in paths)


def test_bad_requests_name_their_field() -> None:
    with pytest.raises(TaxaWorldError, match="image_size"):
        TaxaWorld(image_size=50)
    with pytest.raises(TaxaWorldError, match="count"):
        TaxaWorld().sample(-1, seed=0)
