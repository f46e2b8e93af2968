"""The supervised loop both language stages share: next-token loss on answers, tower frozen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sae_modules.shapes.batches import IGNORE, draw_images, qa_batch
from sae_modules.shapes.prompts import QuestionKind
from sae_modules.shapes.recipe import Recipe


def train_answers(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    recipe: Recipe,
    *,
    stage: str,
    desc: str,
    trainable: Sequence[torch.nn.Module],
    kinds: Sequence[QuestionKind],
    steps: int,
    progress: bool = True,
) -> dict:
    """Train only `trainable` to answer questions of `kinds`; returns the last loss and answer-token accuracy."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = [p for module in trainable for p in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lm_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lm_lr, total_steps=steps, pct_start=0.1)
    rng = recipe.rng(stage)
    model.train()
    loss_value = accuracy = float("nan")
    for _ in tqdm(range(steps), desc=desc, disable=not progress):
        images, attrs = draw_images(rng, recipe.lm_batch, recipe.world_size)
        batch = qa_batch(processor, rng, images, attrs, kinds)
        out = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            predicted, target = out.logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
            scored = target != IGNORE
            accuracy = float((predicted[scored] == target[scored]).float().mean())
            loss_value = float(out.loss)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return {f"{stage}_loss": round(loss_value, 4), f"{stage}_token_accuracy": round(accuracy, 4)}
