"""Finding 2 through a tower: the taxa world's images, the taxa tower's image embedding, a Matryoshka SAE and its control.

The images go through the product's extraction (`run_extraction`, one vector per image) into a
shard directory, both SAEs train on it (`level_comparison`), and depth is measured on the same
images against the tree the world was drawn from (`f<i>_g<j>_s<k>` class folders, read as
iNaturalist folders are). By default the SAEs read the tower's image embedding ("last"), as the
paper's iNaturalist rows read CLIP's; the taxa tower has no projection, so that is its pooled
output, the vector its family, genus and species heads read. Any block's CLS token can be chosen
instead (README, "Finding 2", has the rise at each).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pydantic import BaseModel, Field

from sae_modules.activations.blocks import LAST_LAYER, Layer
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
    layer: Layer = Field(LAST_LAYER, description="'last' (the image embedding) or the block whose CLS token the "
                                                 "SAEs read.")
    saes: LevelSaes = Field(default_factory=LevelSaes)


class TaxaHierarchyFinding(BaseModel):
    settings: TaxaSettings
    world: dict = Field(description="The taxa world the tower was trained on and the images were drawn from.")
    levels: LevelComparison


def run_taxa_hierarchy(out: Path, settings: TaxaSettings, device: str = "cpu",
                       progress: bool = False) -> TaxaHierarchyFinding:
    """Draw the images, extract one vector per image at `settings.layer`, train both SAEs, compare depth by level."""
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
