"""A 3-level label hierarchy over the shapes world: family -> shape -> (colour, shape).

The paper's taxonomy-depth metric asks whether an SAE's latents sit at different depths of a
concept tree (Matryoshka groups should put coarse concepts early). Here the tree is known:
the root `shape` splits into families, each family into shapes, each shape into coloured shapes.
"""

from __future__ import annotations

from sae_modules.shapes.world import COLOURS, SHAPES, ShapeAttributes

ROOT = "shape"
FAMILIES: dict[str, tuple[str, ...]] = {
    "round": ("circle", "ellipse"),
    "polygon": ("square", "triangle", "star", "cross"),
}
FAMILY_OF: dict[str, str] = {shape: family for family, members in FAMILIES.items() for shape in members}
DEPTH = 3

assert set(FAMILY_OF) == set(SHAPES), "every shape belongs to exactly one family"


def label_path(attrs: ShapeAttributes) -> tuple[str, str, str]:
    """The image's labels from the coarsest level down (root excluded): family, shape, colour shape."""
    return FAMILY_OF[attrs.shape], attrs.shape, f"{attrs.colour} {attrs.shape}"


def level_labels(level: int) -> tuple[str, ...]:
    """Every label at `level` (1 = family, 2 = shape, 3 = coloured shape), in a fixed order."""
    if level == 1:
        return tuple(FAMILIES)
    if level == 2:
        return tuple(shape for members in FAMILIES.values() for shape in members)
    if level == 3:
        return tuple(f"{colour} {shape}" for shape in level_labels(2) for colour in COLOURS)
    raise ValueError(f"level: must be 1, 2 or 3, got {level}")


def parent(label: str) -> str:
    """The label one level up; the families' parent is the root."""
    if label in FAMILIES:
        return ROOT
    if label in FAMILY_OF:
        return FAMILY_OF[label]
    colour, _, shape = label.partition(" ")
    if colour in COLOURS and shape in FAMILY_OF:
        return shape
    raise ValueError(f"label: {label!r} is not in the shapes taxonomy")
