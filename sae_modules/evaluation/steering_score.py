"""Steering score (the paper's Table 3): does pinning a latent make the model name its concept?

A latent's prototype is the mean CLIP image embedding of its top images (what it fires on). The
model is asked "What is shown in this image? Use exactly one word!" about probe images with the
latent pinned to `value`; the score is the cosine between the prototype and the CLIP text
embedding of the answer's first word. The unsteered answers give the floor, and, where the probe
images carry true labels, CLIP's own image/label agreement gives the paper's bounds: matched
pairs (upper) and shuffled pairs (chance).

The generation is a parameter, `answer(image, latent, value) -> str` (latent None = unsteered), so
this module needs no serving code: the CLI glue passes a steering engine in.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel
from torch import Tensor

from sae_modules.evaluation.embedders import TextEmbedder
from sae_modules.evaluation.errors import EvaluationError

PROMPT = "What is shown in this image? Use exactly one word!"
PAPER_VALUE = 100.0
Answer = Callable[[Image.Image, int | None, float], str]
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*")


def first_word(text: str) -> str:
    """The answer's first word, lower-cased, punctuation dropped ("" if there is none)."""
    match = _WORD.search(text)
    return match.group(0).lower() if match else ""


class Stat(BaseModel):
    mean: float | None
    std: float | None
    n: int


def stat(values: Tensor) -> Stat:
    values = values.double().flatten()
    return Stat(mean=float(values.mean()) if values.numel() else None,
                std=float(values.std()) if values.numel() > 1 else None, n=values.numel())


class LatentSteering(BaseModel):
    latent: int
    steered: float
    unsteered: float
    answers: list[str]


class SteeringScore(BaseModel):
    top_images_pooling: str | None = None  # the encoded directory's pooling, which chose the prototypes' images
    value: float
    prompt: str
    n_images: int
    steered: Stat
    unsteered: Stat
    matched: Stat | None = None
    shuffled: Stat | None = None
    unsteered_answers: list[str]
    latents: list[LatentSteering]


def prototypes(top_images: Tensor, embed_images: Callable[[list[int]], Tensor]) -> Tensor:
    """[L, D] mean embedding of each latent's top images; `embed_images(indices)` embeds images by index."""
    wanted = sorted({int(i) for i in top_images.flatten()})
    table = embed_images(wanted)
    row = {image: r for r, image in enumerate(wanted)}
    index = torch.tensor([[row[int(i)] for i in latent] for latent in top_images])
    return table[index].mean(dim=1)


class _TextCache:
    def __init__(self, embedder: TextEmbedder) -> None:
        self.embedder, self.table = embedder, {}

    def __call__(self, words: Sequence[str]) -> Tensor:
        new = [w for w in dict.fromkeys(words) if w not in self.table]
        if new:
            for word, row in zip(new, self.embedder.embed_text(new)):
                self.table[word] = row
        return torch.stack([self.table[w] for w in words])


def steering_score(latents: Sequence[int], latent_prototypes: Tensor, probe_images: Sequence[Image.Image],
                   answer: Answer, text_embedder: TextEmbedder, *, value: float = PAPER_VALUE,
                   probe_embeddings: Tensor | None = None, probe_labels: Sequence[str] | None = None,
                   seed: int = 0) -> SteeringScore:
    """Score every (latent, probe image) pair steered and unsteered; bounds when labels are given."""
    if len(latents) != len(latent_prototypes):
        raise EvaluationError(f"{len(latents)} latents but {len(latent_prototypes)} prototypes", "latents")
    if not latents:
        raise EvaluationError("no latents to score", "latents")
    if not probe_images:
        raise EvaluationError("no probe images", "probe_images")
    text = _TextCache(text_embedder)
    protos = F.normalize(latent_prototypes.double(), dim=-1)
    plain = [first_word(answer(image, None, value)) for image in probe_images]
    plain_sim = protos @ F.normalize(text(plain).double(), dim=-1).T                      # [L, images]
    rows, steered_all = [], []
    for r, latent in enumerate(latents):
        words = [first_word(answer(image, latent, value)) for image in probe_images]
        sims = F.normalize(text(words).double(), dim=-1) @ protos[r]
        steered_all.append(sims)
        rows.append(LatentSteering(latent=latent, steered=float(sims.mean()), unsteered=float(plain_sim[r].mean()),
                                   answers=words))
    matched = shuffled = None
    if probe_labels is not None:
        if probe_embeddings is None or len(probe_labels) != len(probe_images) or len(probe_embeddings) != len(
                probe_images):
            raise EvaluationError("the bounds need one label and one image embedding per probe image",
                                  "probe_labels")
        images = F.normalize(probe_embeddings.double(), dim=-1)
        matched = stat((images * F.normalize(text(list(probe_labels)).double(), dim=-1)).sum(dim=1))
        permuted = list(probe_labels)
        random.Random(seed).shuffle(permuted)
        shuffled = stat((images * F.normalize(text(permuted).double(), dim=-1)).sum(dim=1))
    return SteeringScore(value=value, prompt=PROMPT, n_images=len(probe_images), steered=stat(torch.stack(steered_all)),
                         unsteered=stat(plain_sim), matched=matched, shuffled=shuffled, unsteered_answers=plain,
                         latents=rows)
