"""Finding 2's reference point: a concept tree written straight into activation space, no image or tower between.

Every family, genus and species owns a random direction; a vector of a species is the sum of its
family's, its genus' and its own direction, each at a log-normal salience drawn per vector, plus
noise (the traits are inherited, as every bird has feathers and every corvid a corvid's bill). Here
the representation carries the tree by construction, so a Matryoshka SAE's levels *can* go from
coarse to fine: a family latent reads a direction whose strongest vectors span the family, a
species latent one whose strongest vectors are one species. Measuring depth by level here, next to
a plain BatchTopK SAE of the same size (whose latent order means nothing), tells whether our SAE
and depth measure show the paper's trend where the data hold it, apart from whether a given
world and tower do.

Both SAEs go through the product's trainer (`train_sae` on a shard directory), with the demo SAE's
settings; the vectors are regenerated from the seed, so a check can recount every figure.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from sae_modules.activations.shards import ShardManifest, ShardWriter
from sae_modules.evaluation.taxonomy_depth import LevelRow, Path_, by_level, latent_depths
from sae_modules.formats.detect import load_sae
from sae_modules.saes.base import SAE
from sae_modules.train.api import train_sae
from sae_modules.train.config import TrainConfig

TREE_SEED, VECTOR_SEED = 20250301, 20250302


class IdealTree(BaseModel):
    """The tree, how its vectors are drawn and the SAEs trained on them; recorded in the report."""

    families: int = 4
    genera_per_family: int = 4
    species_per_genus: int = 6
    d_in: int = Field(64, description="Width of the vectors (the demo tower's).")
    salience_sigma: float = Field(0.5, description="Log-normal sigma of each level's per-vector salience.")
    noise: float = Field(0.1, description="Std of isotropic Gaussian noise per coordinate (directions have norm ~8).")
    vectors: int = Field(4000, description="Vectors drawn (train and measure: one per 'image').")
    n_latents: int = Field(128, description="Dictionary size, near the tree's 116 concepts.")
    group_fractions: list[float] = Field([0.0625, 0.0625, 0.125, 0.25, 0.5], description="The demo SAE's levels.")
    k: int = 4
    steps: int = 1500
    top_k: int = 16

    @property
    def n_genera(self) -> int:
        return self.families * self.genera_per_family

    @property
    def n_species(self) -> int:
        return self.n_genera * self.species_per_genus

    def sample(self) -> tuple[Tensor, list[Path_]]:
        """The vectors [vectors, d_in] and each one's (family, genus, species) path."""
        tree = torch.Generator().manual_seed(TREE_SEED)
        sizes = (self.families, self.n_genera, self.n_species)
        directions = [torch.randn(n, self.d_in, generator=tree) for n in sizes]
        draw = torch.Generator().manual_seed(VECTOR_SEED)
        species = torch.randint(self.n_species, (self.vectors,), generator=draw)
        genus = species // self.species_per_genus
        family = genus // self.genera_per_family
        x = self.noise * torch.randn(self.vectors, self.d_in, generator=draw)
        for level, index in zip(directions, (family, genus, species)):
            salience = torch.empty(self.vectors, 1).log_normal_(0.0, self.salience_sigma, generator=draw)
            x += salience * level[index]
        paths = [(f"f{f}", f"g{g}", f"s{s}") for f, g, s in zip(family.tolist(), genus.tolist(), species.tolist())]
        return x, paths


class IdealHierarchyFinding(BaseModel):
    tree: IdealTree
    matryoshka: list[LevelRow]
    batchtopk: list[LevelRow] = Field(description="The control, cut at the same latent boundaries.")
    rise: float | None = Field(description="Matryoshka: last level's depth minus the first's.")
    control_rise: float | None
    holds: bool = Field(description="The Matryoshka SAE's depth rises from first to last level more than the "
                                    "control's does.")


def train_on(vectors: Tensor, out: Path, architecture: str, tree: IdealTree, progress: bool = False) -> Path:
    """Write the vectors as a shard directory and train one SAE on them; returns the SAE directory."""
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        manifest = ShardManifest(model="ideal-tree", layer=0, tokens="cls", d_in=tree.d_in,
                                 images=[f"v{i}" for i in range(len(vectors))])
        writer = ShardWriter(shards, manifest, shard_size=len(vectors))
        writer.add(vectors, torch.arange(len(vectors)), torch.zeros(len(vectors), dtype=torch.long))
        writer.finish()
    matryoshka = architecture == "matryoshka_batchtopk"
    config = TrainConfig(
        shards=shards, out=out / architecture, architecture=architecture, n_latents=tree.n_latents, k=tree.k,
        group_fractions=tree.group_fractions if matryoshka else None, auxk_alpha=1 / 32, dead_window=5_000,
        threshold_decay=0.99, threshold_start_step=0, recipe="paper", optimizer="adam", steps=tree.steps,
        batch_size=512, lr=1e-3, warmup_steps=max(1, tree.steps // 20), decay="cosine", seed=0,
        holdout_shards=0, checkpoint_every=tree.steps, keep_checkpoints=1, latent_stats=False, progress=progress,
    )
    return train_sae(config)


@torch.no_grad()
def level_depths(sae: SAE, vectors: Tensor, paths: list[Path_], sizes: list[int], top_k: int) -> list[LevelRow]:
    """Mean LCA depth of the top vectors of each group of latents (`sizes`, in latent order)."""
    values, top = sae.eval().encode(vectors).topk(top_k, dim=0)
    return by_level(latent_depths(top.T, values.T, paths), None, sizes)


def run_ideal_hierarchy(out: Path, tree: IdealTree, progress: bool = False) -> IdealHierarchyFinding:
    """Train the Matryoshka SAE and its BatchTopK control on the tree; depth by level of each."""
    vectors, paths = tree.sample()
    saes = {arch: load_sae(str(train_on(vectors, Path(out), arch, tree, progress)))
            for arch in ("matryoshka_batchtopk", "batchtopk")}
    sizes = saes["matryoshka_batchtopk"].cfg.group_sizes
    rows = {arch: level_depths(sae, vectors, paths, sizes, tree.top_k) for arch, sae in saes.items()}
    rise, control = (_rise(rows[a]) for a in ("matryoshka_batchtopk", "batchtopk"))
    holds = rise is not None and control is not None and rise > max(control, 0.0)
    return IdealHierarchyFinding(tree=tree, matryoshka=rows["matryoshka_batchtopk"], batchtopk=rows["batchtopk"],
                                 rise=rise, control_rise=control, holds=holds)


def _rise(rows: list[LevelRow]) -> float | None:
    if rows[0].depth is None or rows[-1].depth is None:
        return None
    return rows[-1].depth - rows[0].depth
