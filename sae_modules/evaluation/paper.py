"""The paper's three findings in miniature, measured on the shipped shapes-world assets (`evaluate paper`).

1. Monosemanticity: the SAE's latents against the raw neurons of the same block, MS from an
   independent image embedder (the demo's stage-1 CLIP, which the LLaVA's tower left behind).
2. Hierarchy: mean LCA depth of each Matryoshka level's top images in a label tree; the paper finds
   depth rising from coarse to fine levels. Measured three ways: the demo SAE on the shapes world
   (family -> shape -> coloured shape, where it does not hold); a Matryoshka SAE on the taxa world
   through the taxa tower (`taxa_hierarchy`), the finding asserted; and on a tree written straight
   into activations (`ideal_hierarchy`). The last two put a plain BatchTopK SAE beside it as control.
3. Steering: the steering score with latents pinned against unsteered answers, with CLIP's own
   matched and shuffled image/label agreement as upper bound and chance. As in the paper's steering
   experiment (`--mean_pool` for its token-level SAE), latents and their top images come from the
   mean over tokens: a pin acts on every token, so the CLS token alone would pick the wrong images.

Everything is computed here from fresh images drawn with fixed seeds, so one command gives the
same numbers on the same machine type. MS and taxonomy depth use the CLS token (the paper's MS
tables).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from sae_modules.activations.blocks import LAST_LAYER, Layer
from sae_modules.activations.images import FolderImages
from sae_modules.activations.towers import load_tower
from sae_modules.atomic_file import atomic_write_bytes, atomic_write_text
from sae_modules.evaluation.embedders import ClipEmbedder
from sae_modules.evaluation.encode import EncodedDir, Pooling, encode_images
from sae_modules.evaluation.ideal_hierarchy import IdealHierarchyFinding, IdealTree, run_ideal_hierarchy
from sae_modules.evaluation.level_comparison import LevelComparison
from sae_modules.evaluation.monosemanticity import MSReport, monosemanticity, ms_report
from sae_modules.evaluation.steering_score import (
    PAPER_VALUE,
    Answer,
    SteeringScore,
    prototypes,
    steering_score,
)
from sae_modules.evaluation.taxa_hierarchy import TaxaHierarchyFinding, TaxaSettings, run_taxa_hierarchy
from sae_modules.evaluation.taxonomy_depth import LevelRow, by_level, latent_depths
from sae_modules.formats.detect import load_sae
from sae_modules.shapes import DEMO_CLIP_DIR, DEMO_MODEL_DIR, DEMO_SAE_DIR
from sae_modules.shapes.label_tree import label_path
from sae_modules.shapes.world import write_folder

IMAGE_SEED, PROBE_SEED = "paper-findings-images", "paper-findings-probes"


class PaperSettings(BaseModel):
    """What decides the numbers; recorded in the report."""

    images: int = Field(1000, description="Fresh shapes-world images for MS, depth and top images.")
    probes: int = Field(24, description="Probe images the steered model is asked about.")
    latents: int = Field(10, description="Latents steered: the most monosemantic that fire on >= top_k images.")
    top_k: int = Field(16, description="Top images per latent (depth pairs, steering prototypes).")
    value: float = Field(PAPER_VALUE, description="Pin value for steering (the paper's 100).")
    pooling: Pooling = Field("cls", description="Per-image latent value for MS and depth: the paper's MS tables.")
    steering_pooling: Pooling = Field("mean", description="Per-image latent value that picks steered latents and "
                                                          "their top images: the paper's steering experiment.")
    taxa: TaxaSettings = Field(default_factory=TaxaSettings, description="Finding 2 on the taxa world.")
    ideal_tree: IdealTree = Field(default_factory=IdealTree, description="Finding 2's reference tree and SAEs.")
    model: str = str(DEMO_MODEL_DIR)
    sae: str = str(DEMO_SAE_DIR)
    clip: str = str(DEMO_CLIP_DIR)


class MonosemanticityFinding(BaseModel):
    sae: MSReport
    neurons: MSReport
    holds: bool = Field(description="SAE mean MS above the raw neurons' mean MS.")


class HierarchyFinding(BaseModel):
    levels: list[LevelRow]
    depth_first_level: float | None
    depth_last_level: float | None
    holds: bool = Field(description="Shapes world: mean LCA depth of the last level above the first's.")
    taxa: TaxaHierarchyFinding = Field(description="The same measure on the taxa world, through its tower.")
    ideal: IdealHierarchyFinding = Field(description="The same measure where the representation holds the tree.")


class SteeringFinding(BaseModel):
    latent_ms: list[float] = Field(description="MS of each steered latent under `steering_pooling`.")
    score: SteeringScore
    holds: bool = Field(description="shuffled < unsteered < steered <= matched (means).")


class PaperReport(BaseModel):
    settings: PaperSettings
    layer: int
    monosemanticity: MonosemanticityFinding
    hierarchy: HierarchyFinding
    steering: SteeringFinding


def run_paper(out: Path, answer_factory: Callable[[str, str, int, str], Answer], settings: PaperSettings,
              device: str = "cpu", progress: bool = False) -> PaperReport:
    """Write images, encode SAE and raw neurons, measure the three findings; writes report.json/report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, probes = out / "images", out / "probes"
    attrs = write_folder(images, settings.images, seed=IMAGE_SEED)
    write_folder(probes, settings.probes, seed=PROBE_SEED)
    sae = load_sae(settings.sae)
    layer = sae.cfg.source.layer
    tower = load_tower(settings.model, device=device)
    clip = ClipEmbedder(settings.clip, torch.device(device))
    source = FolderImages(images)
    encoded = {
        name: encode_images(tower, layer, module, source, clip, out / f"encoded-{name}", pooling=pooling,
                            sae_name=settings.sae if module is not None else None, progress=progress)
        for name, module, pooling in (("sae", sae, settings.pooling), ("neurons", None, settings.pooling),
                                      ("sae-steering", sae, settings.steering_pooling))
    }
    reports = {}
    for name, data in encoded.items():
        batches = data.batches()
        summary, scores = monosemanticity(batches, batches.n_latents, top_k=settings.top_k, device=device)
        reports[name] = (summary, scores, ms_report(scores, summary.n_images))
    ms = MonosemanticityFinding(sae=reports["sae"][2], neurons=reports["neurons"][2],
                                holds=_above(reports["sae"][2].mean, reports["neurons"][2].mean))
    summary, scores, _ = reports["sae"]
    hierarchy = _hierarchy(summary, scores, [label_path(attrs[_index(i)]) for i in source.ids],
                           sae.cfg.group_sizes, run_taxa_hierarchy(out / "taxa", settings.taxa, device, progress),
                           run_ideal_hierarchy(out / "ideal-tree", settings.ideal_tree, progress))
    steering = _steering(encoded["sae-steering"], *reports["sae-steering"][:2], probes, clip,
                         answer_factory(settings.model, settings.sae, layer, device), settings)
    report = PaperReport(settings=settings, layer=layer, monosemanticity=ms, hierarchy=hierarchy, steering=steering)
    atomic_write_bytes(out / "report.json", report.model_dump_json(indent=1).encode())
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _index(image_id: str) -> int:
    """write_folder names files by draw index: `<label>/<index>.png`."""
    return int(Path(image_id).stem)


def _above(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a > b


def _hierarchy(summary, scores, paths, group_sizes, taxa: TaxaHierarchyFinding,
               ideal: IdealHierarchyFinding) -> HierarchyFinding:
    depths = latent_depths(summary.top_images, summary.top_values, paths)
    rows = by_level(depths, scores, group_sizes)
    scored = [row.depth for row in rows if row.depth is not None]
    first, last = (scored[0], scored[-1]) if scored else (None, None)
    return HierarchyFinding(levels=rows, depth_first_level=first, depth_last_level=last, holds=_above(last, first),
                            taxa=taxa, ideal=ideal)


def _steering(data: EncodedDir, summary, scores, probes: Path, clip: ClipEmbedder, answer: Answer,
              settings: PaperSettings) -> SteeringFinding:
    chosen = choose_latents(summary.top_values, scores, settings.latents)
    source = FolderImages(Path(data.info.root))
    protos = prototypes(summary.top_images[chosen], lambda idx: clip.embed([source.load(i) for i in idx], 0))
    probe_source = FolderImages(probes)
    images = [probe_source.load(i) for i in range(len(probe_source.ids))]
    labels = [label.replace("_", " ") for label in probe_source.labels]
    score = steering_score(chosen, protos, images, answer, clip, value=settings.value, probe_labels=labels,
                           probe_embeddings=clip.embed(images, 0))
    means = [score.shuffled.mean, score.unsteered.mean, score.steered.mean]
    holds = all(_above(b, a) for a, b in itertools.pairwise(means)) and score.steered.mean <= score.matched.mean
    return SteeringFinding(latent_ms=[float(scores[k]) for k in chosen], score=score, holds=holds)


def choose_latents(top_values: torch.Tensor, scores: torch.Tensor, n: int) -> list[int]:
    """The `n` latents with the highest MS among those that fire on all of their top images."""
    eligible = (top_values[:, -1] > 0) & ~torch.isnan(scores)
    ranked = torch.where(eligible, scores, torch.tensor(-math.inf, dtype=scores.dtype)).argsort(descending=True)
    return [int(k) for k in ranked[: min(n, int(eligible.sum()))]]


def render_markdown(report: PaperReport) -> str:
    """The report as the README shows it."""
    ms, hi, st = report.monosemanticity, report.hierarchy, report.steering.score
    s = report.settings
    lines = [
        "# The paper's findings in miniature (shapes world; finding 2 also on the taxa world)",
        "",
        (f"Model `{s.model}`, SAE `{s.sae}` at block {report.layer}, judge/embedder `clip:{s.clip}`; "
        f"{s.images} images, pooling `{s.pooling}`, top {s.top_k} images per latent."),
        "",
        "## 1. SAE latents are more monosemantic than neurons",
        "",
        "| latents | live | MS mean ± std |",
        "|---|---|---|",
        f"| SAE | {ms.sae.n_live} / {ms.sae.n_latents} | {as_figure(ms.sae.mean)} ± {as_figure(ms.sae.std)} |",
        (f"| raw neurons | {ms.neurons.n_live} / {ms.neurons.n_latents} | "
        f"{as_figure(ms.neurons.mean)} ± {as_figure(ms.neurons.std)} |"),
        "",
        f"Holds: **{ms.holds}**.",
        "",
        "## 2. Matryoshka levels from coarse to fine (LCA depth of top images)",
        "",
        "The demo SAE on the shapes world (family → shape → coloured shape):",
        "",
        "| level | latents | scored | LCA depth | MS |",
        "|---|---|---|---|---|",
        *[f"| {r.level} | {r.first_latent}-{r.first_latent + r.n_latents - 1} | {r.n_scored} | "
          f"{as_figure(r.depth)} | {as_figure(r.ms)} |" for r in hi.levels],
        "",
        (f"Holds (last level deeper than the first): **{hi.holds}** (a factorial world: every colour under every "
         "shape)."),
        "",
        *_taxa_lines(hi.taxa),
        *_ideal_lines(hi.ideal),
        "## 3. Steering beats no steering",
        "",
        (f"{len(st.latents)} latents (highest MS, `{s.steering_pooling}` pooling) × {st.n_images} probe images, "
         f"pinned to {st.value:g}:"),
        "",
        "| shuffled (chance) | unsteered | steered | matched (upper) |",
        "|---|---|---|---|",
        (f"| {as_figure(st.shuffled.mean)} | {as_figure(st.unsteered.mean)} | {as_figure(st.steered.mean)} | "
         f"{as_figure(st.matched.mean)} |"),
        "",
        f"Holds (shuffled < unsteered < steered ≤ matched): **{report.steering.holds}**.",
        "",
    ]
    return "\n".join(lines)


def _comparison_lines(levels: LevelComparison) -> list[str]:
    first = levels.runs[0]
    seeds = ", ".join(str(r.seed) for r in levels.runs)
    return [
        f"| level | latents | Matryoshka: LCA depth (seeds {seeds}) | mean | BatchTopK control: LCA depth | mean |",
        "|---|---|---|---|---|---|",
        *[f"| {row.level} | {row.first_latent}-{row.first_latent + row.n_latents - 1} | "
          f"{' / '.join(as_figure(r.matryoshka[i].depth) for r in levels.runs)} | "
          f"{as_figure(levels.matryoshka_depth[i])} | "
          f"{' / '.join(as_figure(r.batchtopk[i].depth) for r in levels.runs)} | "
          f"{as_figure(levels.batchtopk_depth[i])} |"
          for i, row in enumerate(first.matryoshka)],
        "",
        (f"Rise, last level minus first, per seed: Matryoshka {' / '.join(as_figure(r.rise) for r in levels.runs)} "
         f"(mean {as_figure(levels.rise)}), control {' / '.join(as_figure(r.control_rise) for r in levels.runs)} "
         f"(mean {as_figure(levels.control_rise)}). Holds (Matryoshka rises on average, more than the control): "
         f"**{levels.holds}**."),
        "",
    ]


def _taxa_lines(taxa: TaxaHierarchyFinding) -> list[str]:
    w, s = taxa.world, taxa.settings
    return [
        (f"On the taxa world ({w['families']} families × {w['genera_per_family']} genera × "
         f"{w['species_per_genus']} species, each taxon a motif its descendants inherit), {s.images} images "
         f"through the taxa tower, {_taxa_layer(s.layer)}: a Matryoshka SAE of {s.saes.n_latents} latents "
         f"(k = {s.saes.k}) and a plain BatchTopK control of the same size, cut at the same latents:"),
        "",
        *_comparison_lines(taxa.levels),
    ]


def _taxa_layer(layer: Layer) -> str:
    return "its image embedding (the pooled output its heads read)" if layer == LAST_LAYER else f"CLS token of block {layer}"


def _ideal_lines(ideal: IdealHierarchyFinding) -> list[str]:
    t = ideal.tree
    return [
        (f"The same measure on a tree written into activations ({t.families} families × {t.genera_per_family} "
         f"genera × {t.species_per_genus} species, {t.vectors} vectors of width {t.d_in}, no tower), the same two "
         "SAEs:"),
        "",
        *_comparison_lines(ideal.levels),
    ]


def as_figure(value: float | None) -> str:
    """A report figure to 3 decimals, or n/a where there was nothing to measure."""
    return "n/a" if value is None else f"{value:.3f}"
