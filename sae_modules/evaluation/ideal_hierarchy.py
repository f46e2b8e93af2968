"""Finding 2's reference point: a concept tree written straight into activation space, no image or tower between.

Every family, genus and species owns a random direction; a vector of a species is the sum of its
family's, its genus' and its own direction, each at a log-normal salience drawn per vector, plus
noise (the traits are inherited, as every bird has feathers and every corvid a corvid's bill). Here
the representation carries the tree by construction, so a Matryoshka SAE's levels *can* go from
coarse to fine: a family latent reads a direction whose strongest vectors span the family, a
species latent one whose strongest vectors are one species. It tells whether our SAE and depth
measure show the paper's trend where the data hold it, apart from whether a world and tower do.
The vectors are regenerated from the seeds, so a check can recount every figure.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from sae_modules.evaluation.level_comparison import LevelComparison, LevelSaes, compare_levels, write_vectors
from sae_modules.evaluation.taxonomy_depth import Path_
from sae_modules.taxa.world import TreeShape

TREE_SEED, VECTOR_SEED = 20250301, 20250302


class IdealTree(BaseModel, TreeShape):
    """The tree and how its vectors are drawn; recorded in the report."""

    families: int = 4
    genera_per_family: int = 4
    species_per_genus: int = 6
    d_in: int = Field(64, description="Width of the vectors (the demo tower's).")
    salience_sigma: float = Field(0.5, description="Log-normal sigma of each level's per-vector salience.")
    noise: float = Field(0.1, description="Std of isotropic Gaussian noise per coordinate (directions have norm ~8).")
    vectors: int = Field(4000, description="Vectors drawn (train and measure: one per 'image').")
    saes: LevelSaes = Field(default_factory=LevelSaes)

    def sample(self) -> tuple[Tensor, list[Path_]]:
        """The vectors [vectors, d_in] and each one's (family, genus, species) path."""
        tree = torch.Generator().manual_seed(TREE_SEED)
        sizes = (self.families, self.n_genera, self.n_species)
        directions = [torch.randn(n, self.d_in, generator=tree) for n in sizes]
        draw = torch.Generator().manual_seed(VECTOR_SEED)
        species = torch.randint(self.n_species, (self.vectors,), generator=draw)
        family, genus = self.ancestors(species)
        x = self.noise * torch.randn(self.vectors, self.d_in, generator=draw)
        for level, index in zip(directions, (family, genus, species)):
            salience = torch.empty(self.vectors, 1).log_normal_(0.0, self.salience_sigma, generator=draw)
            x += salience * level[index]
        return x, [self.path(s) for s in species.tolist()]


class IdealHierarchyFinding(BaseModel):
    tree: IdealTree
    levels: LevelComparison


def run_ideal_hierarchy(out: Path, tree: IdealTree, progress: bool = False) -> IdealHierarchyFinding:
    """Write the tree's vectors as shards, train the Matryoshka SAE and its control on them, compare."""
    out = Path(out)
    vectors, paths = tree.sample()
    shards = write_vectors(vectors, out / "shards", source="ideal-tree")
    return IdealHierarchyFinding(tree=tree, levels=compare_levels(shards, vectors, paths, out, tree.saes, progress))
