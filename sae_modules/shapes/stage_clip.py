"""Stage 1: train the vision tower as a small CLIP, contrastively against captions, like CLIP itself.

A tiny CLIP text tower learns beside it. The vision tower goes into the LLaVA; the whole CLIP
(both towers, projections, tokenizer, image processor) is also shipped as `assets/clip/`, the
judge of the steering score. It is the tower as it left this stage: instruction tuning (stage 3)
trains the LLaVA's copy further, so the judge shares the LLaVA's starting point but not its final
weights, an independent reader of images and words rather than the model being scored.

Several images in a batch share a caption (the world has few classes), so the loss treats every
matching caption as a positive instead of pretending duplicates are negatives.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, LlavaProcessor

from sae_modules.shapes.batches import draw_images
from sae_modules.shapes.prompts import sample_caption
from sae_modules.shapes.recipe import Recipe


def multi_positive_clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, same: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where `same[i, j]` marks image i and caption j as describing the same thing."""
    logits = scale * F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T
    targets = same.float() / same.sum(dim=1, keepdim=True)
    image_loss = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    targets_t = same.T.float() / same.T.sum(dim=1, keepdim=True)
    text_loss = -(targets_t * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def train_clip(recipe: Recipe, processor: LlavaProcessor, progress: bool = True) -> tuple[CLIPModel, dict]:
    """The trained CLIP and the stage's figures (final loss, in-batch caption accuracy)."""
    tokenizer = processor.tokenizer
    vision = {"image_size": recipe.image_size, "patch_size": recipe.patch_size, **recipe.vision}
    text = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 16,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **recipe.clip_text,
    }
    torch.manual_seed(recipe.seed)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=64)).train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=recipe.clip_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.clip_lr, total_steps=recipe.clip_steps, pct_start=0.1
    )
    rng = recipe.rng("clip")
    # Right padding: CLIP's text tower pools at the first `</s>`.
    tokenizer_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    loss = accuracy = torch.tensor(float("nan"))
    try:
        for _ in tqdm(range(recipe.clip_steps), desc="stage 1/4 CLIP tower", disable=not progress):
            images, attrs = draw_images(rng, recipe.clip_batch, recipe.world_size)
            captions = [sample_caption(rng, a) for a in attrs]
            tokens = tokenizer([c + " </s>" for c in captions], padding=True, return_tensors="pt")
            pixels = processor.image_processor(images, return_tensors="pt").pixel_values
            labels = [a.label for a in attrs]
            same = torch.tensor([[x == y for y in labels] for x in labels])
            out = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
            loss = multi_positive_clip_loss(
                out.image_embeds, out.text_embeds, same, clip.logit_scale.exp().clamp(max=100)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                accuracy = same[torch.arange(len(labels)), out.logits_per_image.argmax(dim=1)].float().mean()
    finally:
        tokenizer.padding_side = tokenizer_side
    return clip.eval(), {
        "clip_loss": round(loss.item(), 4),
        "clip_batch_accuracy": round(float(accuracy), 4),
    }


def vision_tower(clip: CLIPModel) -> CLIPVisionModel:
    """The CLIP's vision tower as the standalone model a LLaVA loads."""
    tower = CLIPVisionModel(clip.config.vision_config)
    tower.load_state_dict(clip.vision_model.state_dict())
    return tower.eval()


def save_clip(clip: CLIPModel, processor: LlavaProcessor, folder: Path) -> None:
    """Write what `clip:PATH` loads: the CLIPModel, its image processor and its tokenizer."""
    clip.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
