"""Latent labels and relative pin values: the CLI against an independent computation, the shipped demo
dictionary (fresh for the shipped SAE, naming its colour and shape latents right) and steering by label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import FolderImages
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower
from sae_modules.evaluation.cli import app
from sae_modules.evaluation.embedders import ClipEmbedder
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_labels import LABELS_JSON, load_latent_labels, load_vocabulary
from sae_modules.evaluation.latent_stats import (
    STATS_JSON,
    STATS_TENSORS,
    LatentStatsAccumulator,
    check_fresh,
    load_latent_stats,
    resolve_units,
)
from sae_modules.formats.native import save_sae
from sae_modules.formats.writing import DICTIONARY_FILES
from sae_modules.intervention_spec import Intervention, InterventionError
from sae_modules.saes import SAEConfig, build_sae
from sae_modules.saes.base import SourceInfo
from sae_modules.shapes import ASSETS_DIR, DEMO_CLIP_DIR, DEMO_MODEL_DIR, DEMO_SAE_DIR
from sae_modules.shapes.concepts import most_selective_latent
from sae_modules.shapes.manifest import verify_manifest
from sae_modules.shapes.prompts import QUESTIONS
from sae_modules.shapes.world import COLOURS, SHAPES, generate, write_folder
from service.engine.engine import SteeringEngine
from service.engine.types import GenerationRequest, SamplingParams, SteerSpec, user_turn
from tests import activations_fixtures as fx

runner = CliRunner()
DEFAULT_RELATIVE = {"value": 5.0, "unit": "max"}   # the README's documented default pin


def test_vocabularies() -> None:
    meta, words = load_vocabulary("imagenet")
    assert meta.size == len(words) == 1000 and words[:2] == ["tench", "goldfish"] and "zebra" in words
    meta, words = load_vocabulary("shapes")
    assert words == [*COLOURS, *SHAPES] and meta.name == "shapes"
    assert load_vocabulary("imagenet")[0].templates[0] == "a photo of a {}."
    with pytest.raises(EvaluationError, match="vocabulary"):
        load_vocabulary("/no/such/file.txt")


def test_vocabulary_file_with_templates(tmp_path) -> None:
    file = tmp_path / "words.txt"
    file.write_text("cat\ndog\n\ncat\ntemplate: a drawing of a {}\n")
    meta, words = load_vocabulary(str(file))
    assert words == ["cat", "dog"] and meta.templates == ["a drawing of a {}"] and meta.name == "words.txt"
    file.write_text("cat\ndog\n")
    assert load_vocabulary(str(file))[0].templates == ["{}"]
    file.write_text("cat\ndog\ntemplate: no slot\n")
    with pytest.raises(EvaluationError, match="template"):
        load_vocabulary(str(file))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """Shapes images, a tiny tower's block-1 activations (3 random patches per image), an SAE on them."""
    root = tmp_path_factory.mktemp("labels")
    write_folder(root / "images", 24, seed=5)
    fx.clip_vision().save_pretrained(root / "tower")
    plan = ExtractionPlan(model=str(root / "tower"), layer=1, tokens=TokenSelection.parse("random:3"))
    run_extraction(load_tower(str(root / "tower"), device="cpu"), FolderImages(root / "images"), root / "acts", plan,
                   progress=False)
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=32, n_latents=40, k=4, threshold=0.05,
                              source=SourceInfo(layer=1, tokens="random:3")))
    save_sae(sae, root / "sae")
    return {"root": root, "images": root / "images", "acts": root / "acts", "sae": root / "sae"}


def test_cli_labels_equal_an_independent_computation(chain) -> None:
    result = runner.invoke(app, ["stats", "--sae", str(chain["sae"]), "--activations", str(chain["acts"]),
                                 "--images", str(chain["images"]), "--clip", f"clip:{DEMO_CLIP_DIR}",
                                 "--vocabulary", "shapes", "--top-k", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    stats, labels = load_latent_stats(chain["sae"]), load_latent_labels(chain["sae"])
    assert labels.vocabulary.name == "shapes" and labels.embedder == f"clip:{DEMO_CLIP_DIR}"
    assert [label.latent for label in labels.labels] == stats.live.nonzero().squeeze(1).tolist()

    clip = ClipEmbedder(str(DEMO_CLIP_DIR), torch.device("cpu"))
    meta, words = load_vocabulary("shapes")
    assert "a {} circle" in meta.templates and "a red {}" in meta.templates and len(meta.templates) == 12
    text = []
    for word in words:
        rows = clip.embed_text([template.format(word) for template in meta.templates]).numpy()
        mean = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(axis=0)
        text.append(mean / np.linalg.norm(mean))
    text = np.stack(text)
    for label in labels.labels:
        names = [name for name, _ in stats.top(label.latent)]
        images = [Image.open(chain["images"] / name).convert("RGB") for name in names]
        proto = clip.embed(images).numpy().mean(axis=0)
        scores = text @ (proto / np.linalg.norm(proto))
        order = np.argsort(-scores)
        assert label.label == words[order[0]] and label.n_images == len(names)
        assert label.score == pytest.approx(scores[order[0]], abs=1e-5)
        assert label.margin == pytest.approx(scores[order[0]] - scores[order[1]], abs=1e-5)


def test_cli_bad_input_names_the_option(chain, tmp_path) -> None:
    result = runner.invoke(app, ["stats", "--sae", str(chain["sae"]), "--activations", str(chain["acts"]),
                                 "--clip", f"clip:{DEMO_CLIP_DIR}", "--vocabulary", "shapes"])
    assert result.exit_code == 2 and "images" in result.output
    result = runner.invoke(app, ["stats", "--sae", str(tmp_path / "none"), "--activations", str(chain["acts"])])
    assert result.exit_code == 2 and "sae" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["stats", "--sae", str(chain["sae"]), "--activations", str(tmp_path)])
    assert result.exit_code == 2 and "activations" in result.output


def test_relative_values_resolve_to_the_documented_raw_value() -> None:
    acc = LatentStatsAccumulator(3, top_k=2)
    acc.update(torch.tensor([[2.0, 0.0, 0.0], [4.0, 1.0, 0.0], [9.0, 0.0, 0.0]]), torch.tensor([0, 1, 2]))
    stats = acc.result(["a", "b", "c"], sae_sha256="x", activations={})
    pins = [Intervention(latent=0, value=3, unit="max"), Intervention(latent=0, mode="nudge", value=2, unit="mean"),
            Intervention(latent=1, value=40.0), Intervention(latent=0, value=1, unit="p99")]
    resolved = resolve_units(pins, stats)
    assert [(p.value, p.unit) for p in resolved] == [(27.0, "raw"), (10.0, "raw"), (40.0, "raw"),
                                                     (pytest.approx(9.0, rel=0.01), "raw")]
    for bad, field in [(Intervention(latent=2, value=1, unit="max"), "interventions.0.unit"),
                       (Intervention(latent=0, mode="mul", value=2, unit="max"), "interventions.0.unit"),
                       (Intervention(latent=7, value=1, unit="max"), "interventions.0.latent")]:
        with pytest.raises(InterventionError) as err:
            resolve_units([bad], stats, "interventions.")
        assert err.value.field == field
    with pytest.raises(InterventionError, match="evaluate stats"):
        resolve_units([pins[0]], None)
    with pytest.raises(InterventionError, match="resolved"):            # the engine never takes a relative value
        pins[0].check_against(3, 10, 1e4)


def test_shipped_dictionary_describes_the_shipped_sae() -> None:
    stats, labels = load_latent_stats(DEMO_SAE_DIR), load_latent_labels(DEMO_SAE_DIR)
    check_fresh(stats.info.sae_sha256, DEMO_SAE_DIR)
    check_fresh(labels.sae_sha256, DEMO_SAE_DIR, "latent labels")
    assert labels.vocabulary.name == "shapes" and stats.info.n_latents == 512
    manifest = verify_manifest(ASSETS_DIR)
    assert {f"sae/{STATS_JSON}", f"sae/{LABELS_JSON}"} <= set(manifest["files"])
    assert json.loads((DEMO_SAE_DIR / STATS_JSON).read_text())["images_root"] == "out/demo-dictionary/images"
    assert DICTIONARY_FILES == {STATS_JSON, STATS_TENSORS, LABELS_JSON}   # a checkpoint save replaces them too


@pytest.fixture(scope="module")
def engine() -> SteeringEngine:
    return SteeringEngine.load(str(DEMO_MODEL_DIR), {"demo": str(DEMO_SAE_DIR)})


@pytest.mark.slow
@pytest.mark.parametrize(("attribute", "concept"), [("colour", "red"), ("shape", "star")])
def test_demo_labels_name_the_selective_latent_and_pinning_it_steers(engine, attribute, concept) -> None:
    """The most selective latent (from activations on fresh images) carries the concept's label; pinning the
    latent that label search ranks first, at the default relative value, makes the model name the concept."""
    images, attrs = zip(*generate(240, seed=4242))
    per_image = engine.encode_latents(engine.preprocess(list(images)), "demo", tokens="patches").amax(dim=1)
    latent, _ = most_selective_latent(per_image, [getattr(a, attribute) for a in attrs], concept)
    labels = load_latent_labels(DEMO_SAE_DIR).by_latent()
    assert labels[latent].label == concept

    stats = load_latent_stats(DEMO_SAE_DIR)
    named = [k for k, label in labels.items() if label.label == concept]
    strongest = max(named, key=lambda k: float(stats.max[k]))     # the search's order (see service/api/dictionary.py)
    pin = resolve_units([Intervention(latent=strongest, **DEFAULT_RELATIVE)], stats)[0]
    assert pin.value == pytest.approx(5 * float(stats.max[strongest]))
    held_out = [image for image, a in generate(150, seed=9090) if getattr(a, attribute) != concept][:30]
    spec = SteerSpec([pin], sae_id="demo", want_stats=False)
    embeds = engine.steer_embeds(engine.preprocess(held_out), [spec] * len(held_out))
    question = QUESTIONS[attribute][0]
    requests = [GenerationRequest(user_turn(question), e.steered, SamplingParams(max_tokens=4)) for e in embeds]
    answers = [out.text.strip() for out in engine.generate(requests)]
    assert answers.count(concept) / len(answers) >= 0.8, answers
