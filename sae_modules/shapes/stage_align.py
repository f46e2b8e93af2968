"""Stage 2: projector alignment — map the frozen tower's patches into the language model's input space.

LLaVA trains only the projector here because its language model is already pretrained. Ours
starts from random weights, so it learns the caption language in the same stage (projector and
language model train, tower frozen) on the captioning task LLaVA's stage 1 uses.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sae_modules.shapes.lm_loop import train_answers
from sae_modules.shapes.recipe import Recipe


def align_projector(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: Recipe, progress: bool = True
) -> dict:
    return train_answers(
        model,
        processor,
        recipe,
        stage="align",
        desc="stage 2/4 align",
        trainable=[
            (model.model.multi_modal_projector, recipe.lm_lr),
            (model.model.language_model, recipe.lm_lr),
            (model.lm_head, recipe.lm_lr),
        ],
        kinds=["describe"],
        steps=recipe.align_steps,
        progress=progress,
    )
