"""Finding 2's measurement: depth by level of a Matryoshka SAE against a plain BatchTopK SAE of the same size.

Both train through the product's trainer on the same shard directory, with the demo SAE's settings
and level fractions, once per seed, and are scored on the same vectors. The control's latent order
means nothing, so its depth "by level" shows how far per-level means move by chance. A first level
of 8 latents gives a noisy mean, so the finding is read over seeds: it holds when the Matryoshka
SAE's depth rises from its first level to its last on average, and by more than the control's does.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from sae_modules.activations.shards import ShardManifest, ShardWriter, iter_shards
from sae_modules.evaluation.taxonomy_depth import LevelRow, Path_, by_level, latent_depths
from sae_modules.formats.detect import load_sae
from sae_modules.saes.base import SAE
from sae_modules.shapes.recipe import Recipe
from sae_modules.train.api import train_sae
from sae_modules.train.config import TrainConfig

ARCHITECTURES = ("matryoshka_batchtopk", "batchtopk")
DEMO = Recipe()


class LevelSaes(BaseModel):
    """The two SAEs compared: sized to the tree (116 concepts), with the demo SAE's levels and settings."""

    n_latents: int = 128
    group_fractions: list[float] = Field(default_factory=lambda: list(DEMO.sae_groups),
                                         description="Matryoshka level sizes as fractions: the demo SAE's.")
    k: int = 4
    steps: int = DEMO.sae_steps
    top_k: int = 16
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="Training seeds; each trains both SAEs.")


class SeedRun(BaseModel):
    seed: int
    matryoshka: list[LevelRow]
    batchtopk: list[LevelRow] = Field(description="The control, cut at the same latent boundaries.")
    rise: float | None = Field(description="Matryoshka: last level's depth minus the first's.")
    control_rise: float | None


class LevelComparison(BaseModel):
    runs: list[SeedRun]
    matryoshka_depth: list[float | None] = Field(description="Per level, the mean over seeds.")
    batchtopk_depth: list[float | None]
    rise: float | None = Field(description="Mean over seeds of the Matryoshka rise.")
    control_rise: float | None
    holds: bool = Field(description="The Matryoshka SAE's depth rises from first to last level on average over "
                                    "seeds, more than the control's does.")


def write_vectors(vectors: Tensor, shards: Path, source: str) -> Path:
    """One vector per 'image' as a complete shard directory (what `vlm-steer extract` writes).

    The manifest names the vectors' sha256, so a rerun with the same vectors finds its shards done
    and one with other vectors is refused rather than trained on stale ones.
    """
    digest = hashlib.sha256(vectors.contiguous().numpy().tobytes()).hexdigest()[:16]
    manifest = ShardManifest(model=f"{source}@{digest}", layer=0, tokens="cls", d_in=vectors.shape[1],
                             images=[f"v{i}" for i in range(len(vectors))])
    writer = ShardWriter(shards, manifest, shard_size=len(vectors))
    if not writer.complete:
        writer.add(vectors, torch.arange(len(vectors)), torch.zeros(len(vectors), dtype=torch.long))
        writer.finish()
    return shards


def shard_vectors(shards: Path) -> Tensor:
    """A one-vector-per-image shard directory's vectors in image order."""
    parts = list(iter_shards(shards))
    vectors = torch.cat([p["activations"] for p in parts]).float()
    order = torch.cat([p["image_index"] for p in parts]).argsort()
    return vectors[order]


def train_saes(shards: Path, out: Path, saes: LevelSaes, seed: int, progress: bool = False) -> dict[str, Path]:
    """Train the Matryoshka SAE and its control on `shards`; their checkpoint directories by architecture.

    `resume`: a rerun into the same folder finishes from the last checkpoint (at once, if training
    had ended) and is refused if the shards or settings changed.
    """
    found = {}
    for arch in ARCHITECTURES:
        config = TrainConfig(
            shards=shards, out=out / f"{arch}-seed{seed}", architecture=arch, n_latents=saes.n_latents, k=saes.k,
            group_fractions=saes.group_fractions if arch == "matryoshka_batchtopk" else None,
            auxk_alpha=DEMO.sae_auxk_alpha, dead_window=DEMO.sae_dead_window, threshold_decay=DEMO.sae_threshold_decay,
            threshold_start_step=0, recipe="paper", optimizer="adam", steps=saes.steps, batch_size=DEMO.sae_batch,
            lr=DEMO.sae_lr, warmup_steps=max(1, saes.steps // 20), decay="cosine",
            seed=seed, holdout_shards=0, checkpoint_every=saes.steps, keep_checkpoints=1, latent_stats=False,
            resume=True, progress=progress,
        )
        found[arch] = train_sae(config)
    return found


@torch.no_grad()
def level_depths(sae: SAE, vectors: Tensor, paths: list[Path_], sizes: list[int], top_k: int) -> list[LevelRow]:
    """Mean LCA depth of the top vectors of each group of latents (`sizes`, in latent order)."""
    values, top = sae.eval().encode(vectors).topk(top_k, dim=0)
    return by_level(latent_depths(top.T, values.T, paths), None, sizes)


def compare_levels(shards: Path, vectors: Tensor, paths: list[Path_], out: Path, saes: LevelSaes,
                   progress: bool = False) -> LevelComparison:
    """Train both SAEs on `shards` per seed, then depth by level of each over `vectors` (one per path)."""
    runs = []
    for seed in saes.seeds:
        trained = {arch: load_sae(str(path)) for arch, path in train_saes(shards, out, saes, seed, progress).items()}
        sizes = trained["matryoshka_batchtopk"].cfg.group_sizes
        rows = {arch: level_depths(sae, vectors, paths, sizes, saes.top_k) for arch, sae in trained.items()}
        runs.append(SeedRun(seed=seed, matryoshka=rows["matryoshka_batchtopk"], batchtopk=rows["batchtopk"],
                            rise=_rise(rows["matryoshka_batchtopk"]), control_rise=_rise(rows["batchtopk"])))
    rise, control = _mean([r.rise for r in runs]), _mean([r.control_rise for r in runs])
    return LevelComparison(
        runs=runs, rise=rise, control_rise=control,
        matryoshka_depth=[_mean([r.matryoshka[i].depth for r in runs]) for i in range(len(runs[0].matryoshka))],
        batchtopk_depth=[_mean([r.batchtopk[i].depth for r in runs]) for i in range(len(runs[0].batchtopk))],
        holds=rise is not None and control is not None and rise > max(control, 0.0),
    )


def _rise(rows: list[LevelRow]) -> float | None:
    if rows[0].depth is None or rows[-1].depth is None:
        return None
    return rows[-1].depth - rows[0].depth


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None if any value is missing: a level some seed could not score is not averaged over the rest."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)
