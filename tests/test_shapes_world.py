"""The shapes world: seeded, within its stated ranges, and laid out the way extraction reads folders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sae_modules.activations.images import FolderImages
from sae_modules.shapes import label_tree
from sae_modules.shapes.world import (
    COLOURS,
    EXAMPLES,
    SHAPES,
    ShapeAttributes,
    WorldError,
    generate,
    render,
    write_examples,
    write_folder,
)


def test_same_seed_same_images_other_seed_differs() -> None:
    first = [(np.asarray(img), attrs) for img, attrs in generate(12, seed=7)]
    again = [(np.asarray(img), attrs) for img, attrs in generate(12, seed=7)]
    other = [attrs for _, attrs in generate(12, seed=8)]
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    assert [a for _, a in first] != other


def test_attributes_stay_in_their_ranges() -> None:
    samples = [attrs for _, attrs in generate(300, seed=1)]
    assert {a.shape for a in samples} == set(SHAPES)
    assert {a.colour for a in samples} == set(COLOURS)
    for a in samples:
        assert 0.25 * 64 <= a.size <= 0.60 * 64
        assert a.size / 2 < a.center_x < 64 - a.size / 2 and a.size / 2 < a.center_y < 64 - a.size / 2
        assert a.background == 255 or 215 <= a.background <= 250


def test_pixels_match_attributes() -> None:
    """A circle's painted area is pi r^2 and its pixels carry its colour; corners stay background."""
    attrs = ShapeAttributes("circle", "blue", size=30, center_x=32, center_y=32, rotation=0.0, rgb=(40, 75, 215),
                            background=230)  # fmt: skip
    pixels = np.asarray(render(attrs, 64)).astype(int)
    assert pixels[0, 0].tolist() == [230, 230, 230]
    painted = np.abs(pixels - 230).sum(axis=-1) > 60
    assert painted.sum() == pytest.approx(math.pi * 15**2, rel=0.08)
    assert np.abs(pixels[32, 32] - np.array([40, 75, 215])).max() <= 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shape": "blob"}, "shape"),
        ({"colour": "teal"}, "colour"),
        ({"image_size": 32}, "image_size"),
        ({"count": -1}, "count"),
    ],
)
def test_bad_requests_name_the_field(kwargs, field) -> None:
    args = {"count": 1, "seed": 0, **kwargs}
    with pytest.raises(WorldError, match=field):
        list(generate(**args))


def test_write_folder_is_what_extraction_reads(tmp_path) -> None:
    written = write_folder(tmp_path, 10, seed=3)
    source = FolderImages(tmp_path)
    assert len(source.ids) == 10
    assert sorted(source.labels) == sorted(a.label for a in written)
    assert not list(tmp_path.rglob("*.tmp"))
    index = int(source.ids[0].split("/")[1].removesuffix(".png"))
    assert source.labels[0] == written[index].label
    assert np.array_equal(np.asarray(source.load(0)), np.asarray(render(written[index], 64)))


def test_examples_are_named_for_what_they_show(tmp_path) -> None:
    paths = write_examples(tmp_path)
    assert [p.name for p in paths] == [f"{c}_{s}.png" for c, s in EXAMPLES]
    for path, (colour, _) in zip(paths, EXAMPLES):
        assert np.asarray(Image.open(path).convert("RGB"))[32, 32].tolist() == list(COLOURS[colour])


def test_taxonomy_has_three_levels_and_consistent_parents() -> None:
    assert [len(label_tree.level_labels(level)) for level in (1, 2, 3)] == [
        2,
        len(SHAPES),
        len(SHAPES) * len(COLOURS),
    ]
    for _, attrs in generate(50, seed=4):
        family, shape, coloured = label_tree.label_path(attrs)
        assert label_tree.parent(coloured) == shape and label_tree.parent(shape) == family
        assert label_tree.parent(family) == label_tree.ROOT
    with pytest.raises(ValueError, match="label"):
        label_tree.parent("teal blob")


def test_flat_folder_keeps_draw_order_so_every_tail_mixes_classes(tmp_path) -> None:
    """by_label=False: sorted files are the draw order, so the last tenth (a trainer's held-out tail) holds many
    classes; the class-folder layout puts only the alphabetically last classes there."""
    attrs = write_folder(tmp_path / "flat", 200, seed=5, by_label=False)
    write_folder(tmp_path / "nested", 200, seed=5)
    flat, nested = FolderImages(tmp_path / "flat").ids, FolderImages(tmp_path / "nested").ids
    assert [Path(i).name for i in flat] == [f"{n:06d}_{a.label}.png" for n, a in enumerate(attrs)]
    tail_classes = {Path(i).name.split("_", 1)[1] for i in flat[-20:]}
    nested_tail = {Path(i).parent.name for i in nested[-20:]}
    assert len(tail_classes) >= 10 and len(nested_tail) <= 3, (tail_classes, nested_tail)
