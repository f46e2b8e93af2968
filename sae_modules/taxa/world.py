"""The taxa world: images whose every visual trait is inherited down a taxonomy, so a concept tree is ground truth.

Each family, genus and species owns a motif, a random 8 × 8 RGB tile repeated over the whole image
(a coat pattern, in effect). An image of a species shows its own motif, its genus' and its
family's, each at a salience drawn per image (log-normal), plus pixel noise. Traits are inherited
as in biology (every bird has feathers, every corvid a corvid's bill) and no motif is shared across
branches, so a latent that reads one motif has top images that share exactly that taxon.

Two choices make the tree visible to an SAE behind a tower (README, "Finding 2"):
- the per-image salience: some images show the family motif strongly, others faintly, whatever
  the species, so a family latent's strongest images can span the family instead of all being
  the one species whose traits happen to push that direction furthest;
- the tile is the tower's patch (8 px at 48 px), so every patch token sees all three motifs whole.
  Smooth textures put only a local colour in each patch, about 3 numbers per motif, and the
  tower's per-token normalisation then mixes the levels.

Why not the shapes world: its colours and shapes combine freely (every colour under every shape),
so a colour latent crosses the tree, and its 36 classes are fewer than the SAE's first levels.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.errors import VlmSteerError

LEVELS = ("family", "genus", "species")


class TaxaWorldError(VlmSteerError):
    """A request the taxa world cannot satisfy (names the offending field)."""


def stable_seed(seed: int | str) -> int:
    """A 63-bit generator seed from an int or a string, the same in every process."""
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little") >> 1


class TreeShape:
    """A complete three-level tree (family, genus, species) given by its branching; species are numbered so
    that a genus' species and a family's genera are contiguous. Mixed into anything with those three counts."""

    families: int
    genera_per_family: int
    species_per_genus: int

    @property
    def n_genera(self) -> int:
        return self.families * self.genera_per_family

    @property
    def n_species(self) -> int:
        return self.n_genera * self.species_per_genus

    def ancestors(self, species: Tensor) -> tuple[Tensor, Tensor]:
        """Each species' family and genus."""
        genus = species // self.species_per_genus
        return genus // self.genera_per_family, genus

    def path(self, species: int) -> tuple[str, str, str]:
        """The species' labels from the coarsest level down (root excluded), unique within each level."""
        genus = species // self.species_per_genus
        return f"f{genus // self.genera_per_family}", f"g{genus}", f"s{species}"


@dataclass(frozen=True)
class TaxaWorld(TreeShape):
    """The tree's shape and how its motifs are drawn; `TaxaWorld()` is the world the shipped tower learned."""

    families: int = 4
    genera_per_family: int = 4
    species_per_genus: int = 6
    image_size: int = 48
    tile: int = 8
    amplitude: tuple[float, float, float] = (0.12, 0.09, 0.07)  # family, genus, species motif std
    salience_sigma: float = 0.7  # log-normal sigma of each level's per-image salience
    noise: float = 0.02
    seed: str = "taxa-world"

    def __post_init__(self) -> None:
        if self.image_size % self.tile:
            raise TaxaWorldError(f"image_size: {self.image_size} is not a multiple of tile {self.tile}")

    @cached_property
    def motifs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Zero-mean, unit-std motifs [n, 3, H, W] of every family, genus and species, tiled over the image."""
        generator = torch.Generator().manual_seed(stable_seed(self.seed))
        repeats = self.image_size // self.tile

        def draw(n: int) -> Tensor:
            tile = torch.randn(n, 3, self.tile, self.tile, generator=generator)
            tile = tile - tile.mean(dim=(1, 2, 3), keepdim=True)
            tile = tile / tile.flatten(1).std(dim=1).view(-1, 1, 1, 1)
            return tile.repeat(1, 1, repeats, repeats)

        return draw(self.families), draw(self.n_genera), draw(self.n_species)

    def label(self, species: int) -> str:
        """The class-folder name `f<i>_g<j>_s<k>`, which `folder_taxonomy` reads back as the path."""
        return "_".join(self.path(species))

    def sample(self, count: int, seed: int | str) -> tuple[Tensor, Tensor]:
        """`count` images as floats in [0, 1] [N, 3, H, W] and their species [N]; the same seed, the same images."""
        if count < 0:
            raise TaxaWorldError(f"count: must be >= 0, got {count}")
        generator = torch.Generator().manual_seed(stable_seed(seed))
        species = torch.randint(self.n_species, (count,), generator=generator)
        family, genus = self.ancestors(species)
        image = torch.full((count, 3, self.image_size, self.image_size), 0.5)
        for motifs, index, amplitude in zip(self.motifs, (family, genus, species), self.amplitude):
            salience = torch.empty(count, 1, 1, 1).log_normal_(0.0, self.salience_sigma, generator=generator)
            image += amplitude * salience * motifs[index]
        image += self.noise * torch.randn(image.shape, generator=generator)
        return image.clamp(0, 1), species

    def images(self, count: int, seed: int | str, chunk: int = 512) -> Iterator[tuple[Image.Image, int]]:
        """PIL images with their species, drawn in chunks so memory does not grow with `count`."""
        for start in range(0, count, chunk):
            pixels, species = self.sample(min(chunk, count - start), seed=f"{seed}/{start}")
            array = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            for rgb, s in zip(array, species.tolist()):
                yield Image.fromarray(np.ascontiguousarray(rgb)), s


def write_folder(world: TaxaWorld, folder: str | Path, count: int, seed: int | str) -> list[int]:
    """Write `count` images as `<folder>/f<i>_g<j>_s<k>/<index>.png`; returns each image's species."""
    folder = Path(folder)
    species = []
    for index, (image, s) in enumerate(world.images(count, seed)):
        target = folder / world.label(s) / f"{index:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(target, buffer.getvalue())
        species.append(s)
    return species
