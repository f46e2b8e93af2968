"""A word for each live latent, found offline and zero-shot with a CLIP text tower.

A latent's prototype is the mean CLIP image embedding of its top images (from its statistics),
as in the paper's steering score; its label is the vocabulary word whose CLIP text embedding is
closest (cosine) to that prototype. Labels are data, not truth: each carries its cosine score,
the margin over the runner-up word, and the vocabulary it was chosen from.

Each word is embedded as CLIP's zero-shot classification does: the mean of its normalised text
embeddings over a few prompt templates (prompt ensembling), which is steadier than one bare word.

Vocabularies: `imagenet` (the 1,000 ImageNet-1k class names as torchvision lists them, shipped as
`vocabularies/imagenet.txt`, with CLIP's photo templates), `shapes` (the demo world's colours and
shapes; templates are the world's captions with one slot open: "a {} circle", "a red {}"), or a text
file with one word or phrase per line, where lines `template: ...{}...` add templates (default `{}`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor

from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.evaluation.embedders import TextEmbedder
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_stats import LatentStats, read_versioned_json

FORMAT = "vlm-steer-latent-labels"
FORMAT_VERSION = 1
LABELS_JSON = "latent_labels.json"
VOCABULARY_DIR = Path(__file__).resolve().parent / "vocabularies"
BUILT_IN = ("imagenet", "shapes")
PHOTO_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
                   "a close-up photo of a {}.", "a cropped photo of the {}.", "art of the {}.")
TEMPLATE_PREFIX = "template:"


class Vocabulary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    size: int
    sha256: str = Field(description="sha256 of the words joined by newlines.")
    templates: list[str] = Field(description="Prompt templates each word is embedded in (mean over them).")


class LatentLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latent: int
    label: str
    score: float = Field(description="Cosine between the label's text embedding and the latent's prototype.")
    margin: float = Field(description="score minus the runner-up word's score.")
    n_images: int = Field(description="Top images in the prototype.")


class LatentLabels(BaseModel):
    """The file's whole content; `labels` holds live latents only, ordered by latent."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    sae_sha256: str
    vocabulary: Vocabulary
    embedder: str
    labels: list[LatentLabel]

    def by_latent(self) -> dict[int, LatentLabel]:
        return {label.latent: label for label in self.labels}


def load_vocabulary(spec: str) -> tuple[Vocabulary, list[str]]:
    """Words and templates of a built-in vocabulary (imagenet, shapes) or of a text file (see the module docstring)."""
    if spec == "shapes":
        from sae_modules.shapes.world import COLOURS, SHAPES

        words = [*COLOURS, *SHAPES]
        templates = [f"a {{}} {shape}" for shape in SHAPES] + [f"a {colour} {{}}" for colour in COLOURS]
    else:
        file = VOCABULARY_DIR / f"{spec}.txt" if spec in BUILT_IN else Path(spec)
        try:
            lines = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise EvaluationError(f"vocabulary {spec!r} is not one of {', '.join(BUILT_IN)} or a readable text "
                                  f"file: {err}", "vocabulary") from None
        words = [line for line in lines if not line.startswith(TEMPLATE_PREFIX)]
        templates = [line[len(TEMPLATE_PREFIX):].strip() for line in lines if line.startswith(TEMPLATE_PREFIX)]
        templates = templates or (list(PHOTO_TEMPLATES) if spec == "imagenet" else ["{}"])
    if any(template.count("{}") != 1 for template in templates):
        raise EvaluationError(f"vocabulary {spec!r}: every template needs exactly one {{}}", "vocabulary")
    words = list(dict.fromkeys(words))
    if len(words) < 2:
        raise EvaluationError(f"vocabulary {spec!r} needs at least two different words", "vocabulary")
    digest = hashlib.sha256("\n".join(words).encode()).hexdigest()
    name = spec if spec in BUILT_IN else Path(spec).name
    return Vocabulary(name=name, size=len(words), sha256=digest, templates=templates), words


def word_embeddings(text: TextEmbedder, words: Sequence[str], templates: Sequence[str], batch: int = 256) -> Tensor:
    """[W, D] unit vectors: each word's normalised text embeddings averaged over the templates, normalised."""
    prompts = [template.format(word) for word in words for template in templates]
    rows = torch.cat([F.normalize(text.embed_text(prompts[i:i + batch]).double(), dim=-1)
                      for i in range(0, len(prompts), batch)])
    return F.normalize(rows.view(len(words), len(templates), -1).mean(dim=1), dim=-1)


def latent_prototypes(stats: LatentStats, embed_images: Callable[[list[str]], Tensor],
                      latents: Sequence[int]) -> tuple[Tensor, Tensor]:
    """([L, D] mean embedding of each latent's top images, [L] how many images each mean is over).

    `embed_images(ids)` embeds images by their ids in the statistics; each image is embedded once.
    Unlike `steering_score.prototypes`, latents may have fewer top images than top_k (rare latents).
    """
    rows = stats.top_images[list(latents)]
    valid = rows >= 0
    wanted = rows[valid].unique()
    table = embed_images([stats.info.images[int(i)] for i in wanted])
    lookup = torch.where(valid, torch.searchsorted(wanted, rows.clamp(min=0)), 0)
    weights = valid.to(table.dtype)
    counts = valid.sum(dim=1)
    sums = (table[lookup] * weights.unsqueeze(-1)).sum(dim=1)
    return sums / counts.clamp(min=1).unsqueeze(1).to(table.dtype), counts


def label_latents(stats: LatentStats, embed_images: Callable[[list[str]], Tensor], text: TextEmbedder,
                  vocabulary: str, embedder_name: str, batch: int = 4096) -> LatentLabels:
    """Label every latent that fired and has top images, with the closest vocabulary word."""
    meta, words = load_vocabulary(vocabulary)
    live = [k for k in range(stats.n_latents) if int(stats.top_images[k, 0]) >= 0]
    if not live:
        raise EvaluationError("no latent fired on any image: nothing to label", "stats")
    word_table = word_embeddings(text, words, meta.templates)
    labels = []
    for start in range(0, len(live), batch):
        chunk = live[start:start + batch]
        protos, counts = latent_prototypes(stats, embed_images, chunk)
        scores = F.normalize(protos.double(), dim=-1) @ word_table.T
        best = scores.topk(2, dim=1)
        for row, latent in enumerate(chunk):
            top, second = best.values[row].tolist()
            labels.append(LatentLabel(latent=latent, label=words[int(best.indices[row, 0])], score=top,
                                      margin=top - second, n_images=int(counts[row])))
    return LatentLabels(sae_sha256=stats.info.sae_sha256, vocabulary=meta, embedder=embedder_name, labels=labels)


def save_latent_labels(labels: LatentLabels, sae_dir: str | Path) -> Path:
    target = Path(sae_dir) / LABELS_JSON
    atomic_write_bytes(target, (labels.model_dump_json(indent=0) + "\n").encode())
    return target


def load_latent_labels(sae_dir: str | Path) -> LatentLabels:
    """The labels beside a checkpoint; EvaluationError names what is missing, newer or malformed."""
    file = Path(sae_dir) / LABELS_JSON
    header = read_versioned_json(file, FORMAT, FORMAT_VERSION, "labels", "run `vlm-steer evaluate stats --clip ...`")
    try:
        return LatentLabels.model_validate(header)
    except ValidationError as err:
        raise EvaluationError(f"{file} is malformed at {err.errors()[0]['loc']}", "labels") from None
