"""The steering engine on a tiny LLaVA loaded from disk: embeddings, statistics, batching, validation."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import N_LATENTS, images, make_sae

from sae_modules.formats import save_sae
from sae_modules.intervention_spec import Intervention, InterventionError
from service.engine.engine import SteeringEngine, UnknownSAEError
from service.engine.loading import SAEMismatchError
from service.engine.types import SteerSpec


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    specs = {"l1": ("batchtopk", 1), "l0": ("relu", 0), "topk": ("topk", -2)}
    return {name: str(save_sae(make_sae(arch, layer, seed=i), root / name))
            for i, (name, (arch, layer)) in enumerate(specs.items())}


@pytest.fixture(scope="module")
def engine(tiny_llava_dir, sae_dirs) -> SteeringEngine:
    return SteeringEngine.load(str(tiny_llava_dir), sae_dirs, default_sae="l1")


@pytest.fixture(scope="module")
def pixels(engine) -> torch.Tensor:
    return engine.preprocess(images(3))


def tower_hidden(engine, pixels) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return engine.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states


def project(engine, block_output: torch.Tensor) -> torch.Tensor:
    """LLaVA's features from block 1's output (vision_feature_layer=-2 of 3 blocks): drop CLS, project."""
    with torch.no_grad():
        return engine.model.model.multi_modal_projector(block_output[:, 1:])


def by_hand_encode(sae, x: torch.Tensor) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    return pre * (pre > sae.cfg.threshold)


def test_facade_properties(engine, tiny_llava_dir):
    assert engine.model_id == str(tiny_llava_dir)
    assert engine.sae_ids == ["l1", "l0", "topk"] and engine.default_sae_id == "l1"
    assert engine.n_tokens == 17
    assert engine.sae().n_latents == N_LATENTS


def test_nothing_edited_error_mode_equals_unpatched_model(engine, pixels):
    specs = [SteerSpec(use_error_term=True, want_default=True, sae_id=sid) for sid in ("l1", "l0", "topk")]
    out = engine.steer_embeds(pixels, specs)
    with torch.no_grad():
        reference = engine.model.get_image_features(pixel_values=pixels).pooler_output
    for i, result in enumerate(out):
        assert result.steered.shape == (16, 64)
        assert (result.steered - reference[i]).abs().max() <= 1e-5
        assert (result.default - reference[i]).abs().max() <= 1e-5
        assert result.embed_cosine == pytest.approx(1.0, abs=1e-6)


def test_paper_mode_nothing_edited_equals_reconstruction_by_hand(engine, pixels):
    hidden = tower_hidden(engine, pixels)
    sae = engine.sae("l1")
    recon = by_hand_encode(sae, hidden[2]) @ sae.W_dec + sae.b_dec
    expected = project(engine, recon)
    out = engine.steer_embeds(pixels, [SteerSpec(sae_id="l1")] * 3)
    for i, result in enumerate(out):
        assert (result.steered - expected[i]).abs().max() <= 1e-5

    relu = engine.sae("l0")
    f0 = ((hidden[1] - relu.b_dec) @ relu.W_enc + relu.b_enc).relu()
    with torch.no_grad():
        block1 = engine.model.model.vision_tower.encoder.layers[1](f0 @ relu.W_dec + relu.b_dec, None)
    expected0 = project(engine, block1)
    out0 = engine.steer_embeds(pixels, [SteerSpec(sae_id="l0")] * 3)
    for i, result in enumerate(out0):
        assert (result.steered - expected0[i]).abs().max() <= 1e-5


def test_pin_in_paper_mode_matches_by_hand_and_reports_stats(engine, pixels):
    hidden = tower_hidden(engine, pixels)[2][:1]
    sae = engine.sae("l1")
    f = by_hand_encode(sae, hidden)
    edited = f.clone()
    edited[:, 1:, 7] = 12.0
    expected = project(engine, edited @ sae.W_dec + sae.b_dec)[0]
    spec = SteerSpec(interventions=[Intervention(latent=7, value=12.0, tokens="patches")], want_default=True)
    result = engine.steer_embeds(pixels[:1], [spec])[0]
    assert (result.steered - expected).abs().max() <= 1e-5
    recon = f @ sae.W_dec + sae.b_dec
    x = hidden[0]
    assert result.stats.l0 == pytest.approx((f[0] != 0).sum(-1).float().mean().item())
    assert result.stats.fvu == pytest.approx((((x - recon[0]) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item(),
                                             rel=1e-4)
    change = result.stats.latents[0]
    assert change.latent == 7 and change.after == 12.0
    assert change.before == pytest.approx(f[0, 1:, 7].mean().item(), abs=1e-5)
    cosine = torch.nn.functional.cosine_similarity(result.steered, result.default, dim=-1).mean().item()
    assert result.embed_cosine == pytest.approx(cosine, abs=1e-6) and cosine < 0.999


def test_batch_of_different_edits_equals_each_alone(engine, pixels):
    specs = [
        SteerSpec(interventions=[Intervention(latent=3, value=8.0)], want_default=True),
        SteerSpec(interventions=[Intervention(latent=5, mode="mul", value=3.0, tokens=[0, 2])], sae_id="l0",
                  use_error_term=True),
        SteerSpec(interventions=[Intervention(latent=9, mode="nudge", value=2.0, tokens="cls")], sae_id="topk",
                  pre_zero=True, want_default=True, want_stats=False),
    ]
    batched = engine.steer_embeds(pixels, specs)
    for i, spec in enumerate(specs):
        alone = engine.steer_embeds(pixels[i:i + 1], [spec])[0]
        assert (batched[i].steered - alone.steered).abs().max() <= 1e-5
        assert (batched[i].default is None) == (alone.default is None) == (not spec.want_default)
        if spec.want_default:
            assert (batched[i].default - alone.default).abs().max() <= 1e-5
        for a, b in zip(batched[i].stats.latents, alone.stats.latents, strict=True):
            assert a.latent == b.latent and a.before == pytest.approx(b.before, abs=1e-5) and a.after == b.after


def test_fast_path_equals_full_path(engine, pixels):
    edits = [Intervention(latent=2, value=5.0), Intervention(latent=40, mode="mul", value=0.0, tokens="patches")]
    fast = engine.steer_embeds(pixels, [SteerSpec(interventions=edits, use_error_term=True, want_stats=False)] * 3)
    full = engine.steer_embeds(pixels, [SteerSpec(interventions=edits, use_error_term=True, want_stats=True)] * 3)
    for a, b in zip(fast, full):
        assert (a.steered - b.steered).abs().max() <= 1e-5
        assert a.stats.l0 is None and b.stats.l0 is not None
        assert [c.latent for c in a.stats.latents] == [c.latent for c in b.stats.latents]
        assert [c.before for c in a.stats.latents] == pytest.approx([c.before for c in b.stats.latents], abs=1e-6)


def test_error_mode_pin_to_current_value_changes_nothing(engine, pixels):
    hidden = tower_hidden(engine, pixels)[2][:1]
    f = by_hand_encode(engine.sae("l1"), hidden)[0]
    token = int(f[:, 4].argmax())
    spec = SteerSpec(interventions=[Intervention(latent=4, value=f[token, 4].item(), tokens=[token])],
                     use_error_term=True, want_default=True)
    result = engine.steer_embeds(pixels[:1], [spec])[0]
    assert (result.steered - result.default).abs().max() <= 1e-5


def test_encode_matches_by_hand(engine, pixels):
    hidden = tower_hidden(engine, pixels)
    latents = engine.encode_latents(pixels, "l1", "patches")
    assert latents.shape == (3, 16, N_LATENTS)
    torch.testing.assert_close(latents, by_hand_encode(engine.sae("l1"), hidden[2][:, 1:]))
    assert engine.encode_latents(pixels[:1], None, [0, 5]).shape == (1, 2, N_LATENTS)


@pytest.mark.parametrize("spec,field", [
    (SteerSpec(interventions=[Intervention(latent=N_LATENTS, value=1.0)]), "interventions.0.latent"),
    (SteerSpec(interventions=[Intervention(latent=0, value=1.0), Intervention(latent=1, value=2e4)]),
     "interventions.1.value"),
    (SteerSpec(interventions=[Intervention(latent=0, value=1.0, tokens=[3, 17])]), "interventions.0.tokens"),
    (SteerSpec(want_steered=False, want_default=False), "types"),
])
def test_bad_specs_are_rejected(engine, pixels, spec, field):
    with pytest.raises(InterventionError) as info:
        engine.steer_embeds(pixels[:1], [spec])
    assert info.value.field == field


def test_unknown_sae_is_rejected(engine, pixels):
    with pytest.raises(UnknownSAEError, match="unknown SAE 'nope'") as info:
        engine.steer_embeds(pixels[:1], [SteerSpec(sae_id="nope")])
    assert info.value.field == "sae"
    with pytest.raises(UnknownSAEError):
        engine.encode_latents(pixels[:1], "nope")


@pytest.mark.parametrize("kwargs,field", [
    ({"architecture": "batchtopk", "layer": 1, "d_in": 48}, "d_in"),
    ({"architecture": "batchtopk", "layer": 2}, "layer"),
    ({"architecture": "batchtopk", "layer": 7}, "layer"),
    ({"architecture": "batchtopk", "layer": "last"}, "layer"),
    ({"architecture": "batchtopk", "layer": 1, "model_id": "openai/clip-vit-base-patch32"}, "model"),
])
def test_sae_that_does_not_fit_is_refused_at_load(tiny_llava_dir, tmp_path, kwargs, field):
    path = save_sae(make_sae(**kwargs), tmp_path / "bad")
    with pytest.raises(SAEMismatchError) as info:
        SteeringEngine.load(str(tiny_llava_dir), {"bad": str(path)})
    assert info.value.field == field


@pytest.mark.parametrize("model_id", ["{model}", "/elsewhere/when/trained/llava", "org/tiny_llava0"])
def test_sae_trained_on_this_model_or_a_local_copy_attaches(tiny_llava_dir, tmp_path, model_id):
    """A hub id attaches by its name; a directory recorded on the training machine is not compared."""
    model_id = model_id.format(model=tiny_llava_dir).replace("tiny_llava0", tiny_llava_dir.name)
    path = save_sae(make_sae("batchtopk", 1, model_id=model_id), tmp_path / "ok")
    assert SteeringEngine.load(str(tiny_llava_dir), {"ok": str(path)}).sae_ids == ["ok"]


def test_sae_without_a_layer_needs_one_given(tiny_llava_dir, tmp_path):
    sae = make_sae("batchtopk", 1)
    sae.cfg = sae.cfg.model_copy(update={"source": sae.cfg.source.model_copy(update={"layer": None})})
    path = str(save_sae(sae, tmp_path / "nolayer"))
    with pytest.raises(SAEMismatchError, match="does not record its layer") as info:
        SteeringEngine.load(str(tiny_llava_dir), {"s": path})
    assert info.value.field == "layer"
    engine = SteeringEngine.load(str(tiny_llava_dir), {"s": path}, sae_layers={"s": -2})
    assert engine.sae_block("s") == 1
