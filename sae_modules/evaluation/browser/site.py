"""Write the latent browser: index.html (data inlined, since file:// pages cannot fetch), the same
data as latents.json, its script and stylesheet, and a grid PNG of each shown latent's top images.
Opens offline; no CDN."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from collections.abc import Callable, Sequence
from importlib.resources import files
from pathlib import Path

from PIL import Image
from pydantic import BaseModel

from sae_modules.evaluation.errors import EvaluationError

ASSETS = ("app.js", "style.css")
GRID_DIR = "grids"
DATA_JSON = "latents.json"
"""The page's data as a file too, for readers that fetch it (the service's /ui playground)."""


class LatentCard(BaseModel):
    latent: int
    level: str
    ms: float | None
    density: float
    max: float
    depth: float | None = None
    grid: str = ""


def image_grid(images: Sequence[Image.Image], thumb: int = 64) -> Image.Image:
    """Thumbnails in a square grid, best first, left to right."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * thumb, rows * thumb), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((thumb, thumb)), ((i % cols) * thumb, (i // cols) * thumb))
    return grid


def write_site(out: str | Path, cards: list[LatentCard], top_images: dict[int, list[int]],
               load_image: Callable[[int], Image.Image], *, title: str, summary: str,
               service_url: str | None = None, thumb: int = 64) -> Path:
    """Write the browser into `out`; returns the path of index.html."""
    out = Path(out)
    (out / GRID_DIR).mkdir(parents=True, exist_ok=True)
    if service_url is not None and not service_url.startswith(("http://", "https://")):
        raise EvaluationError(f"service URL {service_url!r} must start with http:// or https://", "service_url")
    cache: dict[int, Image.Image] = {}
    for card in cards:
        images = [cache.setdefault(i, load_image(i)) for i in top_images[card.latent]]
        if not images:
            raise EvaluationError(f"latent {card.latent} has no top images to show", "latents")
        name = f"{GRID_DIR}/latent-{card.latent:06d}.png"
        image_grid(images, thumb).save(out / name)
        card.grid = name
    levels = list(dict.fromkeys(card.level for card in cards))
    data = {"meta": {"title": title, "summary": summary, "service_url": service_url},
            "levels": levels, "latents": [card.model_dump() for card in cards]}
    blob = json.dumps(data, allow_nan=False).replace("</", "<\\/")
    assets = files("sae_modules.evaluation.browser") / "assets"
    fills = {"TITLE": html.escape(title), "DATA": blob}
    page = re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: fills[m.group(1)], (assets / "index.html").read_text())
    (out / "index.html").write_text(page)
    (out / DATA_JSON).write_text(json.dumps(data, allow_nan=False))
    for name in ASSETS:
        with (assets / name).open("rb") as src, (out / name).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return out / "index.html"

