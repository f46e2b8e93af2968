"""Assemble a small, real LLaVA-1.5-shaped model offline: tokenizer, processor and weights from configs.

Tests and the demo model need a `LlavaForConditionalGeneration` that goes through exactly the
code paths a hub checkpoint does (`save_pretrained` / `from_pretrained`, the processor's image-token
expansion, the chat template) without downloading anything. The tokenizer is word-level over a
known vocabulary, which keeps the language model tiny and its answers exact words.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from sae_modules.errors import VlmSteerError

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

# LLaVA-1.5's template (llava-hf), minus the `{% generation %}` markers: images first, then text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Words the template itself writes; always in the vocabulary so a prompt never becomes <unk>.
TEMPLATE_WORDS = ("user", "assistant", "system", ":")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BuilderError(VlmSteerError):
    """A tiny-model recipe that cannot produce a consistent model (names the offending field)."""


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A lower-casing, punctuation-splitting word-level tokenizer over `words` with LLaVA's specials."""
    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in (*TEMPLATE_WORDS, *words):
        word = word.lower()
        if not word or any(ch.isspace() for ch in word):
            raise BuilderError(f"words: {word!r} is not a single word")
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int) -> LlavaProcessor:
    """A LLaVA-1.5 processor: CLIP preprocessing at `image_size`, one `<image>` token per patch."""
    if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
        raise BuilderError(f"image_size: {image_size} must be a positive multiple of patch_size {patch_size}")
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1,
    )


def build_llava(
    processor: LlavaProcessor,
    *,
    vision: dict,
    text: dict,
    projector_hidden_act: str = "gelu",
    vision_feature_layer: int = -2,
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A randomly initialised LLaVA whose tower, vocabulary and image-token count match `processor`."""
    tokenizer = processor.tokenizer
    image_size = processor.image_processor.crop_size["height"]
    vision = {"image_size": image_size, "patch_size": processor.patch_size, **vision}
    for field in ("image_size", "patch_size"):
        expected = image_size if field == "image_size" else processor.patch_size
        if vision[field] != expected:
            raise BuilderError(f"vision.{field}: {vision[field]} does not match the processor's {expected}")
    text = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **text,
    }
    if text["vocab_size"] < len(tokenizer):
        raise BuilderError(
            f"text.vocab_size: {text['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}"
        )
    vision_config = CLIPVisionConfig(**vision)
    text_config = LlamaConfig(**text)
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    if getattr(text_config, "head_dim", None):
        head_dim = text_config.head_dim
    if head_dim < 64:
        raise BuilderError(f"text: head_dim {head_dim} is below 64, which vLLM's CPU attention needs")
    patches = (image_size // processor.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        image_seq_length=patches,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
