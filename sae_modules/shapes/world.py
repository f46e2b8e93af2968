"""The shapes world: one filled shape of one colour on a plain light background, drawn from a seed.

A world this small has known ground truth (every image's colour and shape), so an SAE's latents,
a steering run or a taxonomy metric can be checked exactly, on a CPU, in seconds.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.errors import VlmSteerError

SHAPES = ("circle", "ellipse", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (240, 210, 35),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
}
MIN_FRACTION, MAX_FRACTION = 0.25, 0.60
COLOUR_JITTER = 18
_SUPERSAMPLE = 4


class WorldError(VlmSteerError):
    """A request the shapes world cannot satisfy (names the offending field)."""


@dataclass(frozen=True)
class ShapeAttributes:
    """What is in one image: the ground truth every check in the demo compares against."""

    shape: str
    colour: str
    size: int
    center_x: int
    center_y: int
    rotation: float
    rgb: tuple[int, int, int]
    background: int

    @property
    def label(self) -> str:
        """The class-subfolder name: `<colour>_<shape>`."""
        return f"{self.colour}_{self.shape}"

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


def _polygon(
    cx: float, cy: float, radius: float, corners: int, rotation: float, inner: float | None = None
) -> list:
    """Vertices of a regular polygon (or a star, alternating `inner`-scaled radii) around a centre."""
    points = []
    steps = corners * 2 if inner else corners
    for i in range(steps):
        r = radius * (inner if inner and i % 2 else 1.0)
        angle = rotation + 2 * math.pi * i / steps - math.pi / 2
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw(draw: ImageDraw.ImageDraw, attrs: ShapeAttributes, scale: int) -> None:
    cx, cy, half = attrs.center_x * scale, attrs.center_y * scale, attrs.size * scale / 2
    fill = attrs.rgb
    if attrs.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif attrs.shape == "ellipse":
        wide = attrs.rotation < math.pi
        rx, ry = (half, half * 0.5) if wide else (half * 0.5, half)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
    elif attrs.shape == "square":
        side = half * 0.9
        draw.polygon(
            _polygon(cx, cy, side * math.sqrt(2), 4, attrs.rotation % (math.pi / 8) + math.pi / 4), fill=fill
        )
    elif attrs.shape == "triangle":
        draw.polygon(_polygon(cx, cy + half * 0.15, half * 1.1, 3, attrs.rotation % (math.pi / 8)), fill=fill)
    elif attrs.shape == "cross":
        arm = half * 0.36
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
    elif attrs.shape == "star":
        draw.polygon(_polygon(cx, cy, half, 5, attrs.rotation % (2 * math.pi / 5), inner=0.42), fill=fill)
    else:
        raise WorldError(f"shape: unknown shape {attrs.shape!r}; expected one of {SHAPES}")


def sample_attributes(
    rng: random.Random, image_size: int, shape: str | None = None, colour: str | None = None
) -> ShapeAttributes:
    """Draw one image's ground truth; `shape`/`colour` fix those attributes instead of sampling them."""
    shape = shape or rng.choice(SHAPES)
    colour = colour or rng.choice(tuple(COLOURS))
    if shape not in SHAPES:
        raise WorldError(f"shape: unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in COLOURS:
        raise WorldError(f"colour: unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    size = rng.randint(math.ceil(MIN_FRACTION * image_size), math.floor(MAX_FRACTION * image_size))
    margin = size // 2 + 1
    rgb = tuple(max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
    return ShapeAttributes(
        shape=shape,
        colour=colour,
        size=size,
        center_x=rng.randint(margin, image_size - margin),
        center_y=rng.randint(margin, image_size - margin),
        rotation=rng.uniform(0, 2 * math.pi),
        rgb=rgb,  # type: ignore[arg-type]
        background=rng.choice((255, rng.randint(215, 250))),
    )


def render(attrs: ShapeAttributes, image_size: int) -> Image.Image:
    """The RGB image for `attrs`, drawn at 4x and downsampled so edges are smooth like a photo's."""
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), (attrs.background,) * 3)
    _draw(ImageDraw.Draw(image), attrs, _SUPERSAMPLE)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def generate(
    count: int, seed: int | str, image_size: int = 64, shape: str | None = None, colour: str | None = None
) -> Iterator[tuple[Image.Image, ShapeAttributes]]:
    """`count` images with their attributes; the same seed always yields the same images."""
    if count < 0:
        raise WorldError(f"count: must be >= 0, got {count}")
    if image_size < 64:
        raise WorldError(f"image_size: must be at least 64, got {image_size}")
    rng = random.Random(seed)
    for _ in range(count):
        attrs = sample_attributes(rng, image_size, shape=shape, colour=colour)
        yield render(attrs, image_size), attrs


def _save_png(image: Image.Image, target: Path) -> None:
    """Encode in memory, then write atomically: a killed run never leaves a torn PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(target, buffer.getvalue())


def write_folder(
    folder: str | Path, count: int, seed: int | str, image_size: int = 64, by_label: bool = True
) -> list[ShapeAttributes]:
    """Write `count` images as `<folder>/<colour>_<shape>/<index>.png` (the layout `vlm-steer extract` reads).

    `by_label=False` writes `<folder>/<index>_<colour>_<shape>.png` instead: sorted file order is then
    draw order, so any slice of the files (e.g. a trainer's held-out tail) mixes every class, where the
    class folders would put the last classes alphabetically in the tail.
    """
    folder = Path(folder)
    written = []
    for index, (image, attrs) in enumerate(generate(count, seed, image_size)):
        target = (
            folder / attrs.label / f"{index:06d}.png"
            if by_label
            else folder / f"{index:06d}_{attrs.label}.png"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_png(image, target)
        written.append(attrs)
    return written


EXAMPLES = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "square"),
    ("purple", "star"),
    ("orange", "cross"),
)


def write_examples(folder: str | Path, image_size: int = 64) -> list[Path]:
    """The shipped example images, `<colour>_<shape>.png`: centred, mid-sized, on white."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for colour, shape in EXAMPLES:
        attrs = ShapeAttributes(
            shape=shape, colour=colour, size=image_size // 2, center_x=image_size // 2, center_y=image_size // 2,
            rotation=0.0, rgb=COLOURS[colour], background=255,
        )  # fmt: skip
        target = folder / f"{attrs.label}.png"
        _save_png(render(attrs, image_size), target)
        paths.append(target)
    return paths
