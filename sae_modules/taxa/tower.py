"""A small vision tower with CLIP's architecture, trained on the taxa world to name each image's taxon.

Three linear heads on the pooled output learn family, genus and species at once, so the tower
knows every level of the tree, as a CLIP trained on captions naming the path ("a bird", "a corvid",
"a raven") would. It is saved as a `CLIPVisionModel` with its image processor, the layout every
`--model` in vlm-steer loads; the heads are saved beside it so its accuracies can be rechecked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from sae_modules.atomic_file import atomic_write_text
from sae_modules.taxa.world import LEVELS, TaxaWorld

HEADS_FILE = "heads.safetensors"
WORLD_FILE = "taxa_world.json"


@dataclass(frozen=True)
class TowerRecipe:
    """Every setting that decides the tower's weights; recorded in the asset's manifest."""

    seed: int = 0
    threads: int = 1
    image_size: int = 48
    patch_size: int = 8
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    steps: int = 800
    batch: int = 64
    lr: float = 2e-3
    held_out: int = 1000
    world: dict = field(default_factory=lambda: asdict(TaxaWorld()))

    @classmethod
    def tiny(cls) -> TowerRecipe:
        """The same pipeline at toy size: proves the build runs end to end, not that it learns."""
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, steps=3,
                   batch=8, held_out=32)

    def taxa_world(self) -> TaxaWorld:
        return world_from_dict(self.world)


def world_from_dict(values: dict) -> TaxaWorld:
    return TaxaWorld(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def image_processor(recipe: TowerRecipe) -> CLIPImageProcessor:
    """Resize the world's images to the tower's input (a no-op at 48 px) and scale [0, 1] to about unit range."""
    side = recipe.image_size
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])


def _targets(world: TaxaWorld, species: list[int]) -> list[torch.Tensor]:
    s = torch.tensor(species)
    family, genus = world.ancestors(s)
    return [family, genus, s]


def _batch(world: TaxaWorld, processor: CLIPImageProcessor, count: int, seed: str) -> tuple[torch.Tensor, list]:
    images, species = zip(*world.images(count, seed))
    return processor(list(images), return_tensors="pt").pixel_values, _targets(world, list(species))


def train_tower(recipe: TowerRecipe, progress: bool = True) -> tuple[CLIPVisionModel, torch.nn.ModuleList, dict]:
    """The trained tower, its three heads and its held-out accuracy per level; the thread count that makes
    the weights reproducible holds only while training (the caller's is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _train(recipe, progress)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: TowerRecipe, progress: bool) -> tuple[CLIPVisionModel, torch.nn.ModuleList, dict]:
    torch.manual_seed(recipe.seed)
    world, processor = recipe.taxa_world(), image_processor(recipe)
    config = CLIPVisionConfig(
        image_size=recipe.image_size, patch_size=recipe.patch_size, hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, hidden_act="quick_gelu",
    )
    tower = CLIPVisionModel(config).train()
    heads = torch.nn.ModuleList(
        [torch.nn.Linear(recipe.hidden_size, n) for n in (world.families, world.n_genera, world.n_species)]
    )
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.1)
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(recipe.steps), desc="taxa tower", disable=not progress):
        pixels, targets = _batch(world, processor, recipe.batch, f"tower-{recipe.seed}-train-{step}")
        pooled = tower(pixel_values=pixels).pooler_output
        loss = sum(F.cross_entropy(head(pooled), y) for head, y in zip(heads, targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    tower.eval()
    figures = {"loss": round(float(loss.detach()), 4), **held_out_accuracy(tower, heads, recipe)}
    return tower, heads, figures


@torch.no_grad()
def held_out_accuracy(tower: CLIPVisionModel, heads: torch.nn.ModuleList, recipe: TowerRecipe) -> dict[str, float]:
    """Accuracy of each head on images drawn with a seed training never uses."""
    pixels, targets = _batch(recipe.taxa_world(), image_processor(recipe), recipe.held_out,
                             f"tower-{recipe.seed}-held-out")
    pooled = tower.eval()(pixel_values=pixels).pooler_output
    return {f"{level}_accuracy": round(float((head(pooled).argmax(1) == y).float().mean()), 4)
            for level, head, y in zip(LEVELS, heads, targets)}


def save_tower(tower: CLIPVisionModel, heads: torch.nn.ModuleList, recipe: TowerRecipe, folder: Path) -> None:
    """The tower as `--model` loads it, its image processor, the world it learned (`taxa_world.json`) and the
    heads as `head.<level>.*` tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(folder)
    image_processor(recipe).save_pretrained(folder)
    atomic_write_text(folder / WORLD_FILE, json.dumps(recipe.world, indent=1) + "\n")
    tensors = {f"head.{level}.{name}": p.detach().contiguous()
               for level, head in zip(LEVELS, heads) for name, p in head.named_parameters()}
    save_file(tensors, str(folder / HEADS_FILE))


def load_world(folder: str | Path) -> TaxaWorld:
    """The world a saved tower was trained on."""
    return world_from_dict(json.loads((Path(folder) / WORLD_FILE).read_text()))


def load_heads(folder: Path) -> torch.nn.ModuleList:
    """The three linear heads saved by `save_tower`."""
    tensors = load_file(str(Path(folder) / HEADS_FILE))
    heads = torch.nn.ModuleList()
    for level in LEVELS:
        weight = tensors[f"head.{level}.weight"]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0])
        head.load_state_dict({"weight": weight, "bias": tensors[f"head.{level}.bias"]})
        heads.append(head)
    return heads
