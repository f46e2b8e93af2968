"""Towers load through the real loading code and read exactly hidden_states[layer + 1]."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sae_modules.activations.blocks import capture_block_output, resolve_layer
from sae_modules.activations.errors import ExtractError
from sae_modules.activations.towers import load_tower
from tests import activations_fixtures as fx


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Image.Image]:
    paths = fx.write_images(tmp_path_factory.mktemp("imgs"), 3)
    return [Image.open(p).convert("RGB") for p in paths]


def _check_layers(tower, reference_tower, pixels):
    with torch.no_grad():
        hidden = reference_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert tower.n_tokens == hidden[0].shape[1] and tower.d_model == hidden[0].shape[2]
    for layer, index in ((0, 1), (1, 2), (-1, 3), (-2, 2)):
        torch.testing.assert_close(tower.layer_output(pixels, layer), hidden[index], rtol=0, atol=1e-6)


def test_clip_vision_model_from_a_directory(tmp_path, images):
    model = fx.clip_vision()
    model.save_pretrained(tmp_path)
    tower = load_tower(str(tmp_path), device="cpu")
    pixels = tower.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32)
    _check_layers(tower, model, pixels)


def test_clip_model_reads_only_its_vision_tower(tmp_path, images):
    model = fx.clip_model()
    model.save_pretrained(tmp_path)
    tower = load_tower(str(tmp_path), device="cpu")
    _check_layers(tower, model.vision_model, tower.preprocess(images))


def test_llava_tower_from_a_sharded_checkpoint_with_its_processor(tmp_path, images):
    model = fx.llava()
    fx.save_llava(model, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    tower = load_tower(str(tmp_path), device="cpu")
    assert sum(p.numel() for p in tower.module.parameters()) == sum(
        p.numel() for p in model.model.vision_tower.parameters()
    )
    pixels = tower.preprocess(images)
    _check_layers(tower, model.model.vision_tower, pixels)
    # LLaVA's own feature path reads block -2 (vision_feature_layer), the same tensor our layer -2 gives.
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="full"
        )
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    projected = model.model.multi_modal_projector(tower.layer_output(pixels, -2))
    torch.testing.assert_close(
        torch.cat(list(features)).reshape(projected.shape), projected, rtol=0, atol=1e-5
    )


def test_legacy_llava_key_layout(tmp_path, images):
    """Checkpoints written before transformers 5 keep the tower at vision_tower.vision_model.*."""
    model = fx.llava()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    legacy = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tower = load_tower(str(tmp_path), device="cpu")
    _check_layers(tower, model.model.vision_tower, tower.preprocess(images))


def test_open_clip_tower_matches_its_own_intermediates(tmp_path, images):
    model, weights = fx.open_clip_tower(tmp_path)
    tower = load_tower(f"open_clip:{fx.OPEN_CLIP_NAME}", weights=str(weights), device="cpu")
    pixels = tower.preprocess(images)
    assert tower.n_tokens == fx.N_TOKENS and tower.d_model == 32
    for layer in (0, 2, -2):
        with torch.no_grad():
            ref = model.visual.forward_intermediates(
                pixels,
                indices=[layer % 3],
                intermediates_only=True,
                output_fmt="NLC",
                output_extra_tokens=True,
            )
        expected = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], dim=1)
        torch.testing.assert_close(tower.layer_output(pixels, layer), expected, rtol=0, atol=1e-6)


def test_capture_stops_the_forward_pass_after_the_block():
    model = fx.clip_vision()
    ran = []
    handle = model.encoder.layers[2].register_forward_hook(lambda *_: ran.append(2))
    with capture_block_output(model.encoder.layers[1], stop=True) as captured:
        model(pixel_values=torch.zeros(1, 3, 32, 32))
    handle.remove()
    assert captured.output.shape == (1, fx.N_TOKENS, 32) and ran == []
    assert not model.encoder.layers[1]._forward_hooks


@pytest.mark.parametrize(
    ("model", "weights", "message"),
    [
        ("open_clip:no-such-model", "w.pt", "not an open_clip model name"),
        ("open_clip:ViT-B-32", None, "--weights: open_clip:ViT-B-32 needs a weights file"),
        ("{tmp}", None, r"not found \(no config.json"),
        ("{tmp}/model.safetensors", None, "is a file"),
    ],
)
def test_bad_models_give_clear_errors(tmp_path, model, weights, message):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ExtractError, match=message):
        load_tower(model.format(tmp=tmp_path), weights=weights and str(tmp_path / weights), device="cpu")


def test_checkpoint_without_a_vision_tower_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ExtractError, match="has no CLIP vision tower"):
        load_tower(str(tmp_path), device="cpu")


def test_open_clip_weights_that_do_not_fit(tmp_path):
    fx.open_clip_tower(tmp_path)
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ExtractError, match="does not fit"):
        load_tower(f"open_clip:{fx.OPEN_CLIP_NAME}", weights=str(tmp_path / "bad.pt"), device="cpu")


def test_layer_out_of_range(tmp_path):
    fx.clip_vision().save_pretrained(tmp_path)
    tower = load_tower(str(tmp_path), device="cpu")
    with pytest.raises(ExtractError, match="--layer: layer 3 is out of range for a tower of 3 blocks"):
        tower.layer_output(torch.zeros(1, 3, 32, 32), 3)


def _embedding(tower, pixels) -> torch.Tensor:
    out = tower.layer_output(pixels, "last")
    assert out.shape == (len(pixels), 1, tower.width_at("last")) and tower.tokens_at("last") == 1
    return out[:, 0]


def test_last_layer_is_each_towers_image_embedding(tmp_path, images):
    """'last': CLIP's projected embedding where the checkpoint has the projection, else the pooled output."""
    clip = fx.clip_model()
    clip.save_pretrained(tmp_path / "clip")
    tower = load_tower(str(tmp_path / "clip"), device="cpu")
    pixels = tower.preprocess(images)
    with torch.no_grad():
        projected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    assert tower.width_at("last") == 16 and tower.width_at(-2) == 32
    torch.testing.assert_close(_embedding(tower, pixels), projected, rtol=0, atol=1e-6)
    _check_layers(tower, clip.vision_model, pixels)

    bare = fx.clip_vision()
    bare.save_pretrained(tmp_path / "vision")
    tower = load_tower(str(tmp_path / "vision"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(_embedding(tower, pixels), bare(pixel_values=pixels).pooler_output, rtol=0, atol=1e-6)

    model, weights = fx.open_clip_tower(tmp_path / "open_clip")
    tower = load_tower(f"open_clip:{fx.OPEN_CLIP_NAME}", weights=str(weights), device="cpu")
    pixels = tower.preprocess(images)
    with torch.no_grad():
        torch.testing.assert_close(_embedding(tower, pixels), model.encode_image(pixels), rtol=0, atol=1e-6)


def test_a_projection_that_does_not_fit_the_tower_is_refused(tmp_path):
    fx.clip_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["visual_projection.weight"] = torch.zeros(16, 31)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExtractError, match=r"visual projection of shape \(16, 31\)"):
        load_tower(str(tmp_path), device="cpu")


def test_the_image_embedding_is_no_block_to_attach_an_sae_to():
    with pytest.raises(ValueError, match="'last' is not a block index"):
        resolve_layer("last", 24)
