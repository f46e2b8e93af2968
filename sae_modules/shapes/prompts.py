"""What the demo model is asked and what it must answer: the question phrasings, captions and vocabulary.

Training draws from several phrasings per question so the model is not brittle to wording; the
evaluation asks the canonical phrasing users will type (the first of each list).
"""

from __future__ import annotations

import random
import re
from typing import Literal

from sae_modules.shapes.world import COLOURS, SHAPES, ShapeAttributes

QuestionKind = Literal["colour", "shape", "one_word", "describe"]

QUESTIONS: dict[QuestionKind, tuple[str, ...]] = {
    "colour": (
        "What color is the shape?",
        "What colour is the shape?",
        "What color is it?",
        "Which color is the shape?",
        "What is the color of the shape?",
        "What color is this shape? Answer with one word.",
    ),
    "shape": (
        "What shape is this?",
        "What shape is it?",
        "Which shape is shown?",
        "What is the shape?",
        "What shape is in the image?",
        "Name the shape.",
    ),
    "one_word": (
        "What is shown in this image? Use exactly one word!",
        "What is in the image? Answer with one word.",
        "What is shown in the image? Use one word.",
        "What do you see? Use exactly one word!",
    ),
    "describe": (
        "Describe the image.",
        "Describe this image.",
        "Describe the picture.",
        "What is in this picture?",
    ),
}
QUESTION_KINDS: tuple[QuestionKind, ...] = tuple(QUESTIONS)

CAPTIONS = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "{colour} {shape}",
    "a {shape} that is {colour}",
)


def answer(kind: QuestionKind, attrs: ShapeAttributes) -> str:
    """The one right answer: a colour, a shape, or `a <colour> <shape>`."""
    if kind == "colour":
        return attrs.colour
    if kind in ("shape", "one_word"):
        return attrs.shape
    return attrs.caption


def sample_question(rng: random.Random, kind: QuestionKind) -> str:
    return rng.choice(QUESTIONS[kind])


def sample_caption(rng: random.Random, attrs: ShapeAttributes) -> str:
    return rng.choice(CAPTIONS).format(colour=attrs.colour, shape=attrs.shape)


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, split the way the word-level tokenizer splits them."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def vocabulary() -> list[str]:
    """Every word a question, caption or answer uses, in a fixed order (so token ids are reproducible)."""
    texts = [q for qs in QUESTIONS.values() for q in qs] + [c.format(colour="", shape="") for c in CAPTIONS]
    seen: dict[str, None] = {}
    for word in [w for text in texts for w in words(text)] + list(COLOURS) + list(SHAPES):
        seen.setdefault(word, None)
    return list(seen)
