"""Stage 3: visual instruction tuning — every question kind, varied phrasings, tower still frozen."""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sae_modules.shapes.lm_loop import train_answers
from sae_modules.shapes.prompts import QUESTION_KINDS
from sae_modules.shapes.recipe import Recipe


def instruct(model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: Recipe, progress: bool = True) -> dict:
    return train_answers(
        model,
        processor,
        recipe,
        stage="instruct",
        desc="stage 3/4 instruct",
        trainable=[model.model.multi_modal_projector, model.model.language_model, model.lm_head],
        kinds=QUESTION_KINDS,
        steps=recipe.instruct_steps,
        progress=progress,
    )
