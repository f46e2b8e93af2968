"""The offline tiny-LLaVA builder must produce a model that behaves like a hub checkpoint."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from sae_modules.shapes.builder import BuilderError, build_llava, build_processor, build_tokenizer

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
CONVERSATION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}
]


def test_tokenizer_lowercases_splits_punctuation_and_keeps_image_token() -> None:
    tokenizer = build_tokenizer(["what", "color", "is", "the", "shape", "?"])
    tokens = tokenizer.tokenize("USER: <image>\nWhat COLOR is the shape? ASSISTANT:")
    assert tokens == ["user", ":", "<image>", "what", "color", "is", "the", "shape", "?", "assistant", ":"]
    ids = tokenizer("<image><image> blorp").input_ids
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids == [tokenizer.bos_token_id, image_id, image_id, tokenizer.unk_token_id]
    assert tokenizer.padding_side == "left"


def test_tokenizer_rejects_multiword_entries() -> None:
    with pytest.raises(BuilderError, match="words"):
        build_tokenizer(["two words"])


def test_round_trip_and_generate(tmp_path) -> None:
    tokenizer = build_tokenizer(["what", "color", "is", "the", "shape", "?", "red", "blue"])
    processor = build_processor(tokenizer, image_size=32, patch_size=8)
    model = build_llava(processor, vision=VISION, text=TEXT, seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)

    prompt = loaded_processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat color is the shape? ASSISTANT:"
    images = [Image.new("RGB", (80, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    inputs = loaded_processor(images=images, text=[prompt, prompt], return_tensors="pt")
    patches = (32 // 8) ** 2
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    assert (inputs.input_ids == loaded.config.image_token_index).sum(dim=1).tolist() == [patches, patches]
    with torch.no_grad():
        features = loaded.get_image_features(pixel_values=inputs.pixel_values).pooler_output
        out = loaded.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert [tuple(f.shape) for f in features] == [(patches, TEXT["hidden_size"])] * 2
    assert out.shape == (2, inputs.input_ids.shape[1] + 3)
    assert torch.equal(out[:, : inputs.input_ids.shape[1]], inputs.input_ids)


def test_same_seed_same_weights_other_seed_differs() -> None:
    processor = build_processor(build_tokenizer(["a"]), image_size=16, patch_size=8)
    first = build_llava(processor, vision=VISION, text=TEXT, seed=1).state_dict()
    again = build_llava(processor, vision=VISION, text=TEXT, seed=1).state_dict()
    other = build_llava(processor, vision=VISION, text=TEXT, seed=2).state_dict()
    name = "model.language_model.embed_tokens.weight"
    assert torch.equal(first[name], again[name])
    assert not torch.equal(first[name], other[name])


@pytest.mark.parametrize(
    ("vision", "text", "field"),
    [
        ({**VISION, "patch_size": 4}, TEXT, "vision.patch_size"),
        (VISION, {**TEXT, "num_attention_heads": 4, "num_key_value_heads": 4}, "head_dim"),
    ],
)
def test_inconsistent_recipes_are_rejected(vision, text, field) -> None:
    processor = build_processor(build_tokenizer(["a"]), image_size=16, patch_size=8)
    with pytest.raises(BuilderError, match=field):
        build_llava(processor, vision=vision, text=text)


def test_processor_rejects_patch_size_not_dividing_image() -> None:
    with pytest.raises(BuilderError, match="image_size"):
        build_processor(build_tokenizer(["a"]), image_size=30, patch_size=8)
