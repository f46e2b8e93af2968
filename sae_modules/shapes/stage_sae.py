"""Stage 4: the Matryoshka BatchTopK SAE on the block that feeds the projector, trained as the paper does.

It goes through the product's own jobs (`extract`, then `train_sae`) on the saved model, so the
shipped SAE is exactly what a user of `vlm-steer extract` + `vlm-steer train` would get.

Tokens per image: the paper samples 2 random tokens from 577. Here a tower sees 36 patches and
the shape covers only a few of them, so 2 tokens would mostly be background; `random:16` makes
nearly every image contribute object patches while still mixing patches from many images.
"""

from __future__ import annotations

from pathlib import Path

from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import FolderImages
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower
from sae_modules.shapes.recipe import Recipe
from sae_modules.shapes.world import write_folder
from sae_modules.train.api import train_sae
from sae_modules.train.config import TrainConfig

SAE_LAYER = -2  # LLaVA-1.5's vision_feature_layer: the block whose output the projector reads


def train_demo_sae(model_dir: Path, work_dir: Path, recipe: Recipe, progress: bool = True) -> Path:
    """Write SAE-training images, extract block -2 activations from the saved model, train; returns the SAE dir."""
    images = work_dir / "images"
    write_folder(
        images, recipe.sae_images, seed=f"shapes-{recipe.seed}-sae-images", image_size=recipe.world_size
    )
    plan = ExtractionPlan(
        model=str(model_dir),
        layer=SAE_LAYER,
        tokens=TokenSelection.parse(f"random:{recipe.sae_tokens}"),
        dtype="float32",
        seed=recipe.seed,
        batch_size=64,
    )
    shards = work_dir / "activations"
    run_extraction(
        load_tower(str(model_dir), device="cpu"), FolderImages(images), shards, plan, progress=progress
    )
    config = TrainConfig(
        shards=shards,
        out=work_dir / "sae-run",
        architecture="matryoshka_batchtopk",
        expansion=recipe.sae_expansion,
        k=recipe.sae_k,
        group_fractions=list(recipe.sae_groups),
        steps=recipe.sae_steps,
        batch_size=recipe.sae_batch,
        lr=recipe.sae_lr,
        warmup_steps=max(1, recipe.sae_steps // 20),
        seed=recipe.seed,
        dead_window=recipe.sae_dead_window,
        holdout=0.1,
        checkpoint_every=recipe.sae_steps,
        keep_checkpoints=1,
        progress=progress,
        threads=recipe.threads,
    )
    return train_sae(config)
