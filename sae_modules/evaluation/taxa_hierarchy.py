"""Finding 2 through a tower: the taxa world's images, the taxa tower's CLS token, a Matryoshka SAE and its control.

The images go through the product's extraction (`run_extraction`, one CLS vector per image) into a
shard directory, both SAEs train on it (`level_comparison`), and depth is measured on the same
images against the tree the world was drawn from (`f<i>_g<j>_s<k>` class folders, read as
iNaturalist folders are). Block 1 of the 4-block tower by default: on the shipped tower its rise is
the largest (blocks 2 and 3, trained harder to tell species apart, make even level 0's top images
mostly one species; README, "Finding 2").
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pydantic import BaseModel, Field

from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import FolderImages
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower
from sae_modules.evaluation.level_comparison import LevelComparison, LevelSaes, compare_levels, shard_vectors
from sae_modules.evaluation.taxonomy_depth import folder_taxonomy
from sae_modules.taxa import TAXA_TOWER_DIR
from sae_modules.taxa.tower import load_world
from sae_modules.taxa.world import write_folder

IMAGE_SEED = "paper-findings-taxa"


class TaxaSettings(BaseModel):
    images: int = Field(3000, description="Taxa-world images (about 31 per species: top 16 needs 16).")
    tower: str = str(TAXA_TOWER_DIR)
    layer: int = Field(1, description="Block whose CLS token the SAEs read.")
    saes: LevelSaes = Field(default_factory=LevelSaes)


class TaxaHierarchyFinding(BaseModel):
    settings: TaxaSettings
    world: dict = Field(description="The taxa world the tower was trained on and the images were drawn from.")
    levels: LevelComparison


def run_taxa_hierarchy(out: Path, settings: TaxaSettings, device: str = "cpu",
                       progress: bool = False) -> TaxaHierarchyFinding:
    """Draw the images, extract the CLS token of `settings.layer`, train both SAEs, compare depth by level."""
    out = Path(out)
    world = load_world(settings.tower)
    write_folder(world, out / "images", settings.images, seed=IMAGE_SEED)
    source = FolderImages(out / "images")
    plan = ExtractionPlan(model=settings.tower, layer=settings.layer, tokens=TokenSelection.parse("cls"),
                          batch_size=64)
    run_extraction(load_tower(settings.tower, device=device), source, out / "activations", plan, progress=progress)
    levels = compare_levels(out / "activations", shard_vectors(out / "activations"), folder_taxonomy(source.ids),
                            out, settings.saes, progress)
    return TaxaHierarchyFinding(settings=settings, world=asdict(world), levels=levels)
