"""The transformers generator: LLaVA's own generate as the reference, batching, stops, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_fixtures import make_sae
from PIL import Image

from sae_modules.formats import save_sae
from service.engine.engine import SteeringEngine, steer_one
from service.engine.generators.transformers_backend import TransformersGenerator
from service.engine.loading import load_llava
from service.engine.prompts import PromptError
from service.engine.types import GenerationRequest, SamplingParams, SteerSpec, user_turn

PROMPT = "what is in the image?"


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_llava(str(tiny_llava_dir))


@pytest.fixture(scope="module")
def generator(llava) -> TransformersGenerator:
    return TransformersGenerator(*llava)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(s).rand(64, 64 + 9 * s, 3) * 255).astype("uint8")) for s in range(3)]


def reference(llava, image: Image.Image, prompt: str, max_new_tokens: int) -> tuple[list[int], int]:
    """LLaVA's greedy answer tokens from pixels, and its prompt length."""
    model, processor = llava
    text = processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    return out[0, prompt_len:].tolist(), prompt_len


def image_embeds(llava, image: Image.Image) -> torch.Tensor:
    model, processor = llava
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixels).pooler_output[0]


def test_greedy_equals_llava_generate_with_pixels(llava, generator, pictures):
    """A batch of prompts of different lengths (left padding) gives each LLaVA's own greedy answer."""
    prompts = [PROMPT, "describe the color", "what shape is it?"]
    requests = [GenerationRequest(user_turn(p), image_embeds(llava, im), SamplingParams(max_tokens=6))
                for p, im in zip(prompts, pictures)]
    outputs = generator.generate(requests)
    tokenizer = llava[1].tokenizer
    for out, p, im in zip(outputs, prompts, pictures):
        expected, prompt_len = reference(llava, im, p, 6)
        assert out.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert out.completion_tokens == 6 and out.finish_reason == "length"
        assert out.prompt_tokens == prompt_len


def test_engine_error_mode_nothing_edited_gives_llava_tokens(tiny_llava_dir, llava, pictures, tmp_path):
    path = save_sae(make_sae("batchtopk", 1), tmp_path / "sae")
    engine = SteeringEngine.load(str(tiny_llava_dir), {"s": str(path)})
    result = steer_one(engine, pictures[0], PROMPT, SteerSpec(use_error_term=True, want_default=True),
                       SamplingParams(max_tokens=5))
    expected = llava[1].tokenizer.decode(reference(llava, pictures[0], PROMPT, 5)[0], skip_special_tokens=True)
    assert result.output("STEERED").text == result.output("DEFAULT").text == expected
    assert result.metrics.embed_cosine == pytest.approx(1.0, abs=1e-6)


def test_different_max_tokens_in_one_batch(llava, generator, pictures):
    embeds = image_embeds(llava, pictures[0])
    short, long = (GenerationRequest(user_turn(PROMPT), embeds, SamplingParams(max_tokens=n)) for n in (2, 7))
    both = generator.generate([short, long])
    assert both[0].completion_tokens == 2 and both[1].completion_tokens == 7
    assert both[1].text.startswith(both[0].text)
    assert both[1].text == generator.generate([long])[0].text


def test_stop_string_truncates_and_says_stop(llava, generator, pictures):
    embeds = image_embeds(llava, pictures[0])
    full = generator.generate([GenerationRequest(user_turn(PROMPT), embeds, SamplingParams(max_tokens=8))])[0]
    words = full.text.split()
    stop = words[1]
    cut = generator.generate([GenerationRequest(user_turn(PROMPT), embeds,
                                                SamplingParams(max_tokens=8, stop=[stop]))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.completion_tokens == len(full.text[: full.text.find(stop) + len(stop)].split())


def test_seeded_sampling_is_reproducible_and_batch_independent(llava, generator, pictures):
    embeds = [image_embeds(llava, im) for im in pictures[:2]]
    params = SamplingParams(max_tokens=6, temperature=1.5, seed=7)
    alone = generator.generate([GenerationRequest(user_turn(PROMPT), embeds[0], params)])[0]
    batch = generator.generate([
        GenerationRequest(user_turn(PROMPT), embeds[1], SamplingParams(max_tokens=6, temperature=1.5, seed=3)),
        GenerationRequest(user_turn(PROMPT), embeds[0], params),
        GenerationRequest(user_turn(PROMPT), embeds[1], SamplingParams(max_tokens=6)),
    ])
    assert batch[1].text == alone.text
    seeds = {generator.generate([GenerationRequest(user_turn(PROMPT), embeds[0], params.model_copy(
        update={"seed": s}))])[0].text for s in range(6)}
    assert len(seeds) > 1, "sampling with different seeds never differs"


def test_conversation_without_one_image_is_refused(llava, generator, pictures):
    conversation = [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    with pytest.raises(PromptError, match="exactly one image"):
        generator.generate([GenerationRequest(conversation, image_embeds(llava, pictures[0]), SamplingParams())])
