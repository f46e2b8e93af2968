"""Training batches drawn fresh from the world: images as pixel tensors, and question/answer token rows.

Every batch goes through the real `LlavaProcessor`, so training sees exactly the tokens and
pixels that inference will, including the `<image>` expansion and the chat template.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import LlavaProcessor

from sae_modules.shapes.prompts import QuestionKind, answer, sample_question
from sae_modules.shapes.world import ShapeAttributes, render, sample_attributes

IGNORE = -100


def draw_images(
    rng: random.Random, count: int, image_size: int
) -> tuple[list[Image.Image], list[ShapeAttributes]]:
    attrs = [sample_attributes(rng, image_size) for _ in range(count)]
    return [render(a, image_size) for a in attrs], attrs


def chat_prompt(processor: LlavaProcessor, question: str) -> str:
    """The generation prompt users send: LLaVA-1.5's `USER: <image>\\n... ASSISTANT:`."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from the first real token, as `generate` counts them under left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def qa_batch(
    processor: LlavaProcessor,
    rng: random.Random,
    images: Sequence[Image.Image],
    attrs: Sequence[ShapeAttributes],
    kinds: Sequence[QuestionKind],
) -> dict[str, torch.Tensor]:
    """Prompt + answer + `</s>` per image; the loss sees only the answer and the end-of-sequence token."""
    tokenizer = processor.tokenizer
    prompts, answers = [], []
    for a in attrs:
        kind = rng.choice(kinds)
        prompts.append(chat_prompt(processor, sample_question(rng, kind)))
        answers.append(answer(kind, a))
    inputs = processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
    answer_ids = [
        tokenizer(" " + text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        for text in answers
    ]
    width = max(len(ids) for ids in answer_ids)
    rows, masks, labels = [], [], []
    for prompt_ids, prompt_mask, ids in zip(inputs.input_ids, inputs.attention_mask, answer_ids):
        pad = width - len(ids)
        # Left padding for the whole row keeps every answer flush right, as in generation.
        rows.append(torch.cat([torch.full((pad,), tokenizer.pad_token_id), prompt_ids, torch.tensor(ids)]))
        masks.append(
            torch.cat(
                [torch.zeros(pad, dtype=torch.long), prompt_mask, torch.ones(len(ids), dtype=torch.long)]
            )
        )
        labels.append(torch.cat([torch.full((pad + len(prompt_ids),), IGNORE), torch.tensor(ids)]))
    attention_mask = torch.stack(masks)
    return {
        "input_ids": torch.stack(rows),
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask),
        "pixel_values": inputs.pixel_values,
        "labels": torch.stack(labels),
    }
