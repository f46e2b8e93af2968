"""Where extraction's images come from: a folder tree, or a `datasets` dataset saved to disk.

A source is an ordered list of image ids (+ optional labels) and a way to open image i. It holds
paths, not open files, so it pickles into Ray workers cheaply.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, UnidentifiedImageError

from sae_modules.activations.errors import ExtractError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class UnreadableImage(Exception):
    """One image cannot be decoded; extraction skips it with a warning."""


class ImageSource(Protocol):
    ids: list[str]
    labels: list[str | None] | None

    def load(self, index: int) -> Image.Image: ...


def _rgb(opener: Any, image_id: str) -> Image.Image:
    try:
        with opener() as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UnreadableImage(f"{image_id}: {type(err).__name__}: {err}") from None


@dataclass
class FolderImages:
    """Every image file under `root`, recursively, in sorted order.

    An image inside a subfolder is labelled with its top-level subfolder (ImageFolder's
    convention: root/cat/x.png is "cat"); when no image sits in a subfolder there are no labels.
    """

    root: Path
    ids: list[str] = field(init=False)
    labels: list[str | None] | None = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise ExtractError(f"--images: {self.root} is not a directory")
        files = sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ExtractError(f"--images: {self.root} holds no image files ({suffixes})")
        self.ids = files
        labels = [f.split("/")[0] if "/" in f else None for f in files]
        self.labels = labels if any(label is not None for label in labels) else None

    def load(self, index: int) -> Image.Image:
        return _rgb(lambda: Image.open(self.root / self.ids[index]), self.ids[index])


@dataclass
class DatasetImages:
    """Rows of a dataset written by `Dataset.save_to_disk` (or a DatasetDict's `split`)."""

    path: Path
    image_column: str = "image"
    label_column: str | None = None
    split: str | None = None
    ids: list[str] = field(init=False)
    labels: list[str | None] | None = field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        dataset = self._open()
        missing = [c for c in (self.image_column, self.label_column) if c and c not in dataset.column_names]
        if missing:
            raise ExtractError(
                f"--dataset: column(s) {missing} not in {self.path} (columns: {dataset.column_names}); "
                "choose them with --image-column / --label-column"
            )
        if len(dataset) == 0:
            raise ExtractError(f"--dataset: {self.path} has no rows")
        self.ids = [str(i) for i in range(len(dataset))]
        self.labels = None
        if self.label_column:
            feature = dataset.features[self.label_column]
            values = dataset[self.label_column]
            to_name = feature.int2str if hasattr(feature, "int2str") else str
            self.labels = [None if v is None else str(to_name(v)) for v in values]

    def _open(self) -> Any:
        try:
            from datasets import Dataset, DatasetDict, load_from_disk
        except ImportError:
            raise ExtractError(
                "--dataset needs the datasets extra: pip install 'vlm-steer[datasets]'"
            ) from None
        try:
            loaded = load_from_disk(str(self.path))
        except FileNotFoundError:
            raise ExtractError(f"--dataset: {self.path} is not a dataset saved with save_to_disk") from None
        if isinstance(loaded, DatasetDict):
            if self.split not in loaded:
                raise ExtractError(f"--split: choose one of {list(loaded)} for {self.path}")
            loaded = loaded[self.split]
        assert isinstance(loaded, Dataset)
        return loaded

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_dataset"}

    def load(self, index: int) -> Image.Image:
        if "_dataset" not in self.__dict__:
            self._dataset = self._open()
        value = self._dataset[index][self.image_column]
        image_id = f"row {index}"
        if isinstance(value, Image.Image):
            return _rgb(lambda: value, image_id)
        if isinstance(value, dict) and value.get("bytes"):
            return _rgb(lambda: Image.open(io.BytesIO(value["bytes"])), image_id)
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, str):
            return _rgb(lambda: Image.open(value), image_id)
        raise UnreadableImage(
            f"{image_id}: column {self.image_column!r} holds {type(value).__name__}, not an image"
        )
