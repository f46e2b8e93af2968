"""How well the demo model answers: greedy generation through the real processor on fresh images.

Answers are compared word for word with the world's ground truth, the way a user would read them.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sae_modules.shapes.batches import chat_prompt
from sae_modules.shapes.prompts import QUESTIONS, QuestionKind, answer
from sae_modules.shapes.world import generate

HELD_OUT_SEED = 20_260_529


@torch.no_grad()
def ask(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    images: list,
    question: str,
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers to one question about each image, decoded without special tokens."""
    prompt = chat_prompt(processor, question)
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [
        text.strip()
        for text in processor.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    ]


def answer_accuracy(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    count: int = 200,
    seed: int = HELD_OUT_SEED,
    world_size: int = 64,
    kinds: tuple[QuestionKind, ...] = ("colour", "shape", "one_word", "describe"),
    batch_size: int = 50,
    progress: bool = False,
) -> dict[str, float]:
    """Fraction of exactly right answers per question kind (canonical phrasing) on `count` fresh images."""
    images, attrs = zip(*generate(count, seed, world_size)) if count else ((), ())
    right = dict.fromkeys(kinds, 0)
    for start in tqdm(range(0, count, batch_size), desc="evaluate", disable=not progress):
        chunk = list(images[start : start + batch_size])
        for kind in kinds:
            replies = ask(model, processor, chunk, QUESTIONS[kind][0])
            right[kind] += sum(
                r == answer(kind, a) for r, a in zip(replies, attrs[start : start + batch_size])
            )
    return {kind: right[kind] / count for kind in kinds}
