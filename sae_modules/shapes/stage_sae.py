"""Stage 4: the Matryoshka BatchTopK SAE on the block that feeds the projector, trained as the paper does.

It goes through the product's own jobs (`extract`, then `train_sae`) on the saved model, so the
shipped SAE is exactly what a user of `vlm-steer extract` + `vlm-steer train` would get. Every
training setting is passed explicitly: the trainer's defaults may follow the paper's recipe for
large runs, and the shipped SAE must not change when they do.

Tokens per image: the paper samples 2 random tokens from 577. Here a tower sees 36 patches and
the shape covers only a few of them, so 2 tokens would mostly be background; `random:16` makes
nearly every image contribute object patches while still mixing patches from many images.

The images are written in draw order (not in class folders), so the trainer's held-out tail is a
random sample of every class rather than the last classes alphabetically.
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
HOLDOUT = 0.1  # fraction of the extracted vectors the SAE's recorded metrics are measured on


def sae_train_config(shards: Path, out: Path, recipe: Recipe, progress: bool = True) -> TrainConfig:
    """The demo SAE's training run, with every setting that decides its weights given explicitly."""
    return TrainConfig(
        shards=shards,
        out=out,
        architecture="matryoshka_batchtopk",
        expansion=recipe.sae_expansion,
        k=recipe.sae_k,
        group_fractions=list(recipe.sae_groups),
        auxk_alpha=recipe.sae_auxk_alpha,
        auxk_k=None,
        auxk_trains_encoder=True,
        dead_window=recipe.sae_dead_window,
        threshold_decay=recipe.sae_threshold_decay,
        b_dec_init="geometric_median",
        threshold_start_step=0,
        recipe="paper",
        optimizer="adam",
        steps=recipe.sae_steps,
        batch_size=recipe.sae_batch,
        lr=recipe.sae_lr,
        betas=(0.9, 0.999),
        warmup_steps=max(1, recipe.sae_steps // 20),
        decay="cosine",
        min_lr_ratio=0.0,
        grad_clip=1.0,
        seed=recipe.seed,
        buffer_mb=1024,
        scale_batches=10,
        holdout=HOLDOUT,
        checkpoint_every=recipe.sae_steps,
        keep_checkpoints=1,
        progress=progress,
        threads=recipe.threads,
    )


def train_demo_sae(model_dir: Path, work_dir: Path, recipe: Recipe, progress: bool = True) -> Path:
    """Write SAE-training images, extract block -2 activations from the saved model, train; returns the SAE dir."""
    images = work_dir / "images"
    write_folder(
        images,
        recipe.sae_images,
        seed=f"shapes-{recipe.seed}-sae-images",
        image_size=recipe.world_size,
        by_label=False,
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
    return train_sae(sae_train_config(shards, work_dir / "sae-run", recipe, progress))
