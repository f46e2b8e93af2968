"""Training batches must match what inference sends, and the loss must see only the answers."""

from __future__ import annotations

import random

import torch

from sae_modules.shapes.batches import IGNORE, chat_prompt, draw_images, qa_batch
from sae_modules.shapes.builder import build_processor, build_tokenizer
from sae_modules.shapes.prompts import QUESTIONS, answer, vocabulary

PROCESSOR = build_processor(build_tokenizer(vocabulary()), image_size=48, patch_size=8)


def test_every_question_and_answer_is_in_vocabulary() -> None:
    tokenizer = PROCESSOR.tokenizer
    _, attrs = draw_images(random.Random(0), 40, 64)
    texts = [q for qs in QUESTIONS.values() for q in qs] + [answer(k, a) for k in QUESTIONS for a in attrs]
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text).input_ids, text


def test_labels_cover_exactly_the_answer_and_end_token() -> None:
    rng = random.Random(1)
    images, attrs = draw_images(rng, 6, 64)
    batch = qa_batch(PROCESSOR, random.Random(2), images, attrs, ["describe", "colour"])
    tokenizer = PROCESSOR.tokenizer
    replay = random.Random(2)
    for row, a in enumerate(attrs):
        kind = replay.choice(["describe", "colour"])
        replay.choice(QUESTIONS[kind])
        labels = batch["labels"][row]
        answer_ids = labels[labels != IGNORE].tolist()
        assert answer_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer_ids[:-1]) == answer(kind, a)
        # Labelled tokens are the row's last tokens, and they equal the input there.
        n = len(answer_ids)
        assert batch["input_ids"][row, -n:].tolist() == answer_ids
    image_tokens = (batch["input_ids"] == PROCESSOR.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [36] * 6
    first_real = batch["attention_mask"].argmax(dim=1)
    assert torch.all(batch["position_ids"][torch.arange(6), first_real] == 0)
    assert batch["pixel_values"].shape == (6, 3, 48, 48)


def test_chat_prompt_is_llava_15() -> None:
    assert chat_prompt(PROCESSOR, "What shape is this?") == "USER: <image>\nWhat shape is this? ASSISTANT:"
