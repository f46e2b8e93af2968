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
    trainable: Sequence[tuple[torch.nn.Module, float]],
    kinds: Sequence[QuestionKind],
    steps: int,
    progress: bool = True,
) -> dict:
    """Train only the `(module, peak learning rate)` pairs to answer questions of `kinds`.

    Returns the last batch's loss and answer-token accuracy.
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    groups = [{"params": list(module.parameters()), "lr": lr} for module, lr in trainable if lr > 0]
    for group in groups:
        for parameter in group["params"]:
            parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[group["lr"] for group in groups], total_steps=steps, pct_start=0.1
    )
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
