"""Stage 3: visual instruction tuning — every question kind, varied phrasings.

As in LLaVA-NeXT's fine-tuning stage, the vision tower trains too (`recipe.instruct_tower_lr`;
0 keeps it frozen as LLaVA-1.5 does). A tower trained contrastively from scratch for minutes on a
CPU knows colours well but shapes only roughly: frozen, the model named the shape of 52% of
held-out images; training with the answers (800 steps) raised that to 73%. The answers' gradient
reaches every block up to the one the projector reads.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration, LlavaProcessor

from sae_modules.shapes.lm_loop import train_answers
from sae_modules.shapes.prompts import QUESTION_KINDS
from sae_modules.shapes.recipe import Recipe


def instruct(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, recipe: Recipe, progress: bool = True
) -> dict:
    return train_answers(
        model,
        processor,
        recipe,
        stage="instruct",
        desc="stage 3/4 instruct",
        trainable=[
            (model.model.multi_modal_projector, recipe.lm_lr),
            (model.model.language_model, recipe.lm_lr),
            (model.lm_head, recipe.lm_lr),
            (model.model.vision_tower, recipe.instruct_tower_lr),
        ],
        kinds=QUESTION_KINDS,
        steps=recipe.instruct_steps,
        progress=progress,
    )
