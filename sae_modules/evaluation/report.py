"""Evaluate an encoded directory and write report.json, report.md, the plots and the browser.

Everything the report states is computed here from the per-latent results (MS, range, firing,
top images, LCA depth) and the optional reconstruction and steering results passed in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel
from torch import Tensor

from sae_modules.activations.blocks import Layer
from sae_modules.activations.images import FolderImages
from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.evaluation.browser.site import LatentCard, write_site
from sae_modules.evaluation.encode import EncodedDir
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_summary import LatentSummary
from sae_modules.evaluation.monosemanticity import DEFAULT_MEMORY_BYTES, MSReport, monosemanticity, ms_report
from sae_modules.evaluation.plots import histogram
from sae_modules.evaluation.taxonomy_depth import LevelRow, by_level, latent_depths


@dataclass
class Evaluation:
    summary: LatentSummary
    ms: Tensor
    depths: Tensor | None
    levels: list[LevelRow]
    group_sizes: list[int] | None


def evaluate_encoded(encoded: EncodedDir, *, top_k: int = 16, group_sizes: Sequence[int] | None = None,
                     taxonomy: Sequence[tuple[str, ...]] | None = None, batch_size: int = 1024,
                     memory_bytes: int = DEFAULT_MEMORY_BYTES, device: str = "cpu") -> Evaluation:
    """MS, latent summary and (with a taxonomy) LCA depths, grouped by Matryoshka level."""
    batches = encoded.batches(batch_size)
    summary, ms = monosemanticity(batches, batches.n_latents, top_k=top_k, memory_bytes=memory_bytes, device=device)
    depths = None
    if taxonomy is not None:
        if len(taxonomy) != summary.n_images:
            raise EvaluationError(f"the taxonomy covers {len(taxonomy)} images, the activations {summary.n_images}",
                                  "taxonomy")
        depths = latent_depths(summary.top_images, summary.top_values, taxonomy)
    sizes = list(group_sizes) if group_sizes else None
    levels = by_level(depths if depths is not None else torch.full_like(ms, math.nan), ms, sizes)
    return Evaluation(summary, ms, depths, levels, sizes)


class Report(BaseModel):
    """report.json."""

    model: str
    layer: Layer
    sae: str | None
    pooling: str
    embedder: str
    n_images: int
    n_latents: int
    ms_mean: float | None
    ms_std: float | None
    n_live: int
    never_fire: int
    density_mean: float
    best: list[tuple[int, float]]
    worst: list[tuple[int, float]]
    levels: list[LevelRow]
    reconstruction: dict[str, float] | None = None
    steering: dict | None = None
    files: dict[str, str]


def _level_name(row: LevelRow, n_levels: int) -> str:
    if n_levels == 1:
        return "all"
    return f"level {row.level} ({row.first_latent}-{row.first_latent + row.n_latents - 1})"


def browser_latents(ev: Evaluation, cap: int) -> list[int]:
    """Live latents to show; above `cap`, each level gets its share, spread evenly over its MS ranking."""
    live = ev.summary.live
    chosen: list[int] = []
    total = int(live.sum())
    for row in ev.levels:
        index = torch.arange(row.first_latent, row.first_latent + row.n_latents)
        index = index[live[index]]
        if total > cap:
            share = max(1, round(cap * len(index) / total)) if len(index) else 0
            scores = torch.nan_to_num(ev.ms[index], nan=-2.0)
            ranked = index[torch.argsort(scores, descending=True)]
            picks = torch.linspace(0, len(ranked) - 1, min(share, len(ranked))).round().long().unique()
            index = ranked[picks]
        chosen.extend(int(i) for i in index)
    return chosen


def write_report(out: str | Path, encoded: EncodedDir, ev: Evaluation, *, reconstruction: dict[str, float] | None = None,
                 steering: dict | None = None, service_url: str | None = None, browser_cap: int = 512,
                 images_root: str | Path | None = None) -> Report:
    """Write report.json, report.md, ms.json, the histograms and (given the images) the browser."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = encoded.info
    ms = ms_report(ev.ms, ev.summary.n_images)
    atomic_write_bytes(out / "ms.json", ms.model_dump_json().encode())
    files = {"ms": "ms.json", "ms_histogram": "ms_hist.png", "density_histogram": "density_hist.png"}
    histogram(ev.ms, out / files["ms_histogram"], title="Monosemanticity score", xlabel="MS")
    histogram(ev.summary.density, out / files["density_histogram"], title="Latent firing density",
              xlabel="fraction of images", log_x=True)
    if ev.depths is not None:
        files["depth_histogram"] = "depth_hist.png"
        histogram(ev.depths, out / files["depth_histogram"], title="Mean LCA depth of top images", xlabel="depth")
    root = images_root or info.root
    if root:
        files["browser"] = _browser(out / "browser", encoded, ev, ms, Path(root), service_url, browser_cap)
    report = Report(
        model=info.model, layer=info.layer, sae=info.sae, pooling=info.pooling, embedder=info.embedder,
        n_images=ev.summary.n_images, n_latents=ev.ms.numel(), ms_mean=ms.mean, ms_std=ms.std, n_live=ms.n_live,
        never_fire=int((ev.summary.fires == 0).sum()), density_mean=float(ev.summary.density.mean()),
        best=ms.best, worst=ms.worst, levels=ev.levels, reconstruction=reconstruction, steering=steering,
        files=files,
    )
    atomic_write_bytes(out / "report.json", report.model_dump_json(indent=1).encode())
    atomic_write_bytes(out / "report.md", markdown(report).encode())
    return report


def _browser(out: Path, encoded: EncodedDir, ev: Evaluation, ms: MSReport, root: Path, service_url: str | None,
             cap: int) -> str:
    images = FolderImages(root)
    if images.ids != encoded.info.ids:
        raise EvaluationError(f"the images under {root} are not the ones that were encoded", "images")
    names = {}
    for row in ev.levels:
        for latent in range(row.first_latent, row.first_latent + row.n_latents):
            names[latent] = _level_name(row, len(ev.levels))
    cards, top = [], {}
    for latent in browser_latents(ev, cap):
        fired = int(min(ev.summary.fires[latent], ev.summary.top_images.shape[1]))
        top[latent] = [int(i) for i in ev.summary.top_images[latent, :max(fired, 1)]]
        depth = None if ev.depths is None or math.isnan(ev.depths[latent]) else float(ev.depths[latent])
        cards.append(LatentCard(latent=latent, level=names[latent], ms=ms.ms[latent],
                                density=float(ev.summary.density[latent]), max=float(ev.summary.hi[latent]),
                                depth=depth))
    summary = (f"{encoded.info.sae or 'raw neurons'} on {encoded.info.model} layer {encoded.info.layer}; "
               f"{ev.summary.n_images} images; MS {_pm(ms.mean, ms.std)} over {ms.n_live} live latents; "
               f"showing {len(cards)}")
    index = write_site(out, cards, top, images.load, title=encoded.info.sae or "raw neurons", summary=summary,
                       service_url=service_url)
    return str(index.relative_to(out.parent))


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown(report: Report) -> str:
    """report.md: the same facts as report.json, for people."""
    lines = [
        f"# Evaluation of {report.sae or 'raw neurons (No SAE)'}",
        "",
        f"- Model: `{report.model}`, layer {report.layer}, per-image pooling: {report.pooling}",
        f"- Images: {report.n_images}; embedder for MS: `{report.embedder}`",
        f"- Latents: {report.n_latents}; with an MS: {report.n_live}; never firing: {report.never_fire}",
        f"- Monosemanticity score: {_pm(report.ms_mean, report.ms_std)} (mean ± std over latents with a score)",
        f"- Mean firing density: {report.density_mean:.4f}",
        "",
    ]
    if report.reconstruction:
        lines += ["## Reconstruction", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in report.reconstruction.items()]
        lines.append("")
    lines += ["## By level", "", "| level | latents | scored | mean LCA depth | (paper rounding) | mean MS |",
              "|---|---|---|---|---|---|"]
    for row in report.levels:
        cells = [row.level, f"{row.first_latent}-{row.first_latent + row.n_latents - 1}", row.n_scored,
                 _num(row.depth), _num(row.depth_rounded), _num(row.ms)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## Most and least monosemantic latents", "", "| best latent | MS | worst latent | MS |",
              "|---|---|---|---|"]
    for (b, bs), (w, ws) in zip(report.best, report.worst):
        lines.append(f"| {b} | {bs:.4f} | {w} | {ws:.4f} |")
    if report.steering:
        lines += ["", "## Steering score", "", "```json", json.dumps(report.steering, indent=1), "```"]
    lines += ["", "## Files", ""] + [f"- {k}: [{v}]({v})" for k, v in report.files.items()]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
