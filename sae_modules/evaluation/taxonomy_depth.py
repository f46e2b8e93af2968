"""Taxonomy depth of latents (the paper's Table 2): how specific a latent's top images are.

For each latent, take its top-k images (k = 16, so 120 pairs), the depth of the lowest common
ancestor of each pair in a label hierarchy (0 = only the root is shared), and average. A Matryoshka
SAE's early levels should hold general concepts (shallow LCA), later levels specific ones. As in
the paper, a latent that fires on fewer than k images is left out (its top-k would include
images it does not fire on).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path, PurePath

import torch
from pydantic import BaseModel
from torch import Tensor

from sae_modules.evaluation.errors import EvaluationError

Path_ = tuple[str, ...]


def lca_depth(a: Path_, b: Path_) -> int:
    """Number of leading labels two root-to-leaf paths share."""
    depth = 0
    for x, y in zip(a, b):
        if x != y:
            break
        depth += 1
    return depth


def folder_taxonomy(images: Sequence[str]) -> list[Path_]:
    """Each image's parent folder name split on "_", as iNaturalist 2021 is laid out
    (`00000_Animalia_Chordata_..._species/photo.jpg`); a leading numeric id is dropped."""
    paths = []
    for image in images:
        parts = PurePath(image).parent.name.split("_")
        if parts and re.fullmatch(r"\d+", parts[0]):
            parts = parts[1:]
        if not parts or parts == [""]:
            raise EvaluationError(f"image {image!r} is not inside a class folder, so it has no taxonomy path",
                                  "taxonomy")
        paths.append(tuple(parts))
    return paths


def csv_taxonomy(file: str | os.PathLike, images: Sequence[str]) -> list[Path_]:
    """Paths from a CSV with a header: column `image`, then either one column `path` holding
    "/"-separated labels (root first) or one column per level, root first."""
    file = Path(file)
    try:
        with file.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as err:
        raise EvaluationError(f"cannot read taxonomy CSV {file}: {err}", "taxonomy") from None
    if not rows or not rows[0] or rows[0][0] != "image" or len(rows[0]) < 2:
        raise EvaluationError(f"{file} needs a header row starting with 'image' and at least one label column",
                              "taxonomy")
    split = rows[0][1:] == ["path"]
    table: dict[str, Path_] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(rows[0]):
            raise EvaluationError(f"{file} line {line} has {len(row)} columns, the header has {len(rows[0])}",
                                  "taxonomy")
        table[row[0]] = tuple(row[1].split("/")) if split else tuple(row[1:])
    missing = [image for image in images if image not in table]
    if missing:
        raise EvaluationError(f"{file} has no path for {len(missing)} images, e.g. {missing[0]!r}", "taxonomy")
    return [table[image] for image in images]


def latent_depths(top_images: Tensor, top_values: Tensor, paths: Sequence[Path_]) -> Tensor:
    """Mean pairwise LCA depth over each latent's top images [F] (NaN if it fires on too few images)."""
    n_latents, k = top_images.shape
    if k < 2:
        raise EvaluationError("taxonomy depth needs at least 2 top images per latent", "top_k")
    depths = torch.full((n_latents,), math.nan, dtype=torch.float64)
    for latent in range(n_latents):
        if top_values[latent, -1] <= 0:
            continue
        group = [paths[int(i)] for i in top_images[latent]]
        pairs = [lca_depth(a, b) for a, b in combinations(group, 2)]
        depths[latent] = sum(pairs) / len(pairs)
    return depths


class LevelRow(BaseModel):
    """One Matryoshka level: its latents, mean LCA depth and mean MS (the paper's Table 2 row)."""

    level: int
    first_latent: int
    n_latents: int
    n_scored: int
    depth: float | None
    depth_rounded: float | None
    ms: float | None


def by_level(depths: Tensor, ms: Tensor | None, group_sizes: Sequence[int] | None) -> list[LevelRow]:
    """Per-level means; `depth_rounded` rounds each latent's depth first, as the paper's script does."""
    sizes = list(group_sizes) if group_sizes else [depths.numel()]
    if sum(sizes) != depths.numel():
        raise EvaluationError(f"group sizes {sizes} do not sum to the {depths.numel()} latents", "group_sizes")
    rows, start = [], 0
    for level, size in enumerate(sizes):
        d = depths[start:start + size]
        d = d[~torch.isnan(d)]
        m = None if ms is None else ms[start:start + size]
        m = None if m is None else m[~torch.isnan(m)]
        rows.append(LevelRow(
            level=level, first_latent=start, n_latents=size, n_scored=d.numel(),
            depth=float(d.mean()) if d.numel() else None,
            depth_rounded=float(torch.round(d).mean()) if d.numel() else None,
            ms=float(m.mean()) if m is not None and m.numel() else None,
        ))
        start += size
    return rows
