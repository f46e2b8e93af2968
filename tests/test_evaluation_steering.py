"""Steering score: the numbers against an independent computation, and the whole command end to
end through the real steering engine on the tiny LLaVA (conftest's `tiny_llava_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae_modules.evaluation.embedders import load_embedder
from sae_modules.evaluation.encode import EncodedDir
from sae_modules.evaluation.steering_score import PROMPT, first_word, prototypes, steering_score
from sae_modules.formats.native import save_sae
from sae_modules.saes import build_sae
from sae_modules.saes.base import SAEConfig, SourceInfo
from sae_modules.shapes.builder import build_tokenizer
from sae_modules.shapes.world import write_folder

WORDS = ("red", "blue", "green", "circle", "square", "triangle", "star", "cross", "ellipse", "yellow", "purple",
         "orange", "a", "shape")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("clip_text")
    tok = build_tokenizer(WORDS)
    torch.manual_seed(0)
    text = {"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_first_word_normalises_answers():
    assert first_word("  Circle. It is") == "circle"
    assert first_word("red-ish square") == "red-ish"
    assert first_word("...") == ""


def test_scores_equal_an_independent_computation(clip_dir):
    clip = load_embedder(f"clip:{clip_dir}")
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green", "yellow")]
    top = torch.tensor([[0, 1], [2, 3]])
    protos = prototypes(top, lambda idx: clip.embed([images[i] for i in idx]))
    assert torch.allclose(protos[0], clip.embed(images[:2]).mean(0), atol=1e-6)

    answers = {None: "A shape.", 4: "Red circle", 9: "square!"}
    calls = []

    def answer(image, latent, value):
        calls.append((latent, value))
        return answers[latent]

    probes, labels = images[:3], ["red circle", "blue square", "green star"]
    result = steering_score([4, 9], protos, probes, answer, clip, value=50.0,
                            probe_embeddings=clip.embed(probes), probe_labels=labels, seed=1)
    assert calls.count((None, 50.0)) == 3 and calls.count((4, 50.0)) == 3 and calls.count((9, 50.0)) == 3

    def cos(a, b):
        return float(F.cosine_similarity(a.double(), b.double(), dim=0))

    text = {w: clip.embed_text([w])[0] for w in ("a", "red", "square")}
    assert result.latents[0].answers == ["red"] * 3 and result.unsteered_answers == ["a"] * 3
    assert result.latents[0].steered == pytest.approx(cos(protos[0], text["red"]), abs=1e-6)
    assert result.latents[1].steered == pytest.approx(cos(protos[1], text["square"]), abs=1e-6)
    assert result.latents[1].unsteered == pytest.approx(cos(protos[1], text["a"]), abs=1e-6)
    assert result.steered.mean == pytest.approx((cos(protos[0], text["red"]) + cos(protos[1], text["square"])) / 2,
                                                abs=1e-6)
    assert result.steered.n == 6 and result.unsteered.n == 6
    matched = [cos(clip.embed([p])[0], clip.embed_text([lab])[0]) for p, lab in zip(probes, labels)]
    assert result.matched.mean == pytest.approx(sum(matched) / 3, abs=1e-5)
    assert result.shuffled.n == 3 and result.prompt == PROMPT


def test_steering_command_runs_end_to_end_through_the_engine(tiny_llava_dir, clip_dir, tmp_path):
    from service.cli import app

    write_folder(tmp_path / "images", 12, seed=3)
    write_folder(tmp_path / "probes", 2, seed=4)
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=32, n_latents=24, k=4, threshold=0.05,
                              source=SourceInfo(layer=-2)))
    save_sae(sae, tmp_path / "sae")
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "ms", "--out", str(tmp_path / "ms.json"), "--sae", str(tmp_path / "sae"),
                                 "--model", str(tiny_llava_dir), "--images", str(tmp_path / "images"),
                                 "--embedder", f"clip:{clip_dir}", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "steering", "--encoded", str(tmp_path / "ms-encoded"),
                                 "--clip", f"clip:{clip_dir}", "--model", str(tiny_llava_dir), "--sae",
                                 str(tmp_path / "sae"), "--probe-images", str(tmp_path / "probes"),
                                 "--n-latents", "2", "--top-k", "4", "--out", str(tmp_path / "steer.json"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    body = json.loads((tmp_path / "steer.json").read_text())
    assert len(body["latents"]) == 2 and body["n_images"] == 2 and body["value"] == 100.0
    assert body["steered"]["n"] == 4 and -1 <= body["steered"]["mean"] <= 1
    assert body["matched"]["n"] == 2 and body["shuffled"]["n"] == 2
    result = runner.invoke(app, ["evaluate", "report", "--encoded", str(tmp_path / "ms-encoded"), "--steering",
                                 str(tmp_path / "steer.json"), "--out", str(tmp_path / "report"), "--top-k", "4",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["steering"]["steered"] == body["steered"]
    assert "## Steering score" in (tmp_path / "report" / "report.md").read_text()


def test_every_evaluate_command_takes_the_layer_from_a_flag_when_the_sae_records_none(
    tiny_llava_dir, clip_dir, tmp_path
):
    """The paper's releases record no layer: without --layer each command says so in one line (exit 2, no
    traceback); with --layer it runs and the encoded directory records that block."""
    from service.cli import app

    write_folder(tmp_path / "images", 6, seed=3)
    write_folder(tmp_path / "probes", 1, seed=4)
    save_sae(build_sae(SAEConfig(architecture="batchtopk", d_in=32, n_latents=24, k=4, threshold=0.05)),
             tmp_path / "sae")
    chain = ["--sae", str(tmp_path / "sae"), "--model", str(tiny_llava_dir), "--images", str(tmp_path / "images"),
             "--embedder", f"clip:{clip_dir}", "--device", "cpu"]
    steering = ["evaluate", "steering", "--encoded", str(tmp_path / "ms-encoded"), "--clip", f"clip:{clip_dir}",
                "--model", str(tiny_llava_dir), "--sae", str(tmp_path / "sae"), "--probe-images",
                str(tmp_path / "probes"), "--latents", "0", "--top-k", "2", "--out", str(tmp_path / "steer.json"),
                "--device", "cpu"]
    runner = CliRunner()
    for command in (["evaluate", "ms", "--out", str(tmp_path / "ms.json"), *chain],
                    ["evaluate", "report", "--out", str(tmp_path / "report"), *chain], steering):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command[1], result.output)
        assert "layer" in result.output and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    result = runner.invoke(app, ["evaluate", "ms", "--out", str(tmp_path / "ms.json"), *chain, "--layer", "-2"])
    assert result.exit_code == 0, result.output
    assert EncodedDir.open(tmp_path / "ms-encoded").info.layer == -2
    result = runner.invoke(app, [*steering, "--layer", "-2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "steer.json").read_text())["steered"]["n"] == 1


def test_last_layer_is_the_clip_image_embedding_after_the_projection(clip_dir, tmp_path):
    """`--layer last`: one value per image and projection dimension, equal to CLIP's own image_embeds."""
    from transformers import CLIPModel, CLIPProcessor

    from service.cli import app

    write_folder(tmp_path / "images", 6, seed=3)
    result = CliRunner().invoke(app, ["evaluate", "ms", "--out", str(tmp_path / "ms.json"), "--raw-neurons",
                                      "--layer", "last", "--model", str(clip_dir), "--images",
                                      str(tmp_path / "images"), "--embedder", f"clip:{clip_dir}", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    body = json.loads((tmp_path / "ms.json").read_text())
    assert body["layer"] == "last" and body["n_latents"] == 8 and body["n_images"] == 6
    data = EncodedDir.open(tmp_path / "ms-encoded")
    acts = torch.cat([load_file(data.path / f)["activations"] for f in data.info.activation_files])
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    images = [Image.open(tmp_path / "images" / i).convert("RGB") for i in data.info.ids]
    with torch.no_grad():
        expected = model(**processor(text=["x"], images=images, return_tensors="pt", padding=True)).image_embeds
    # image_embeds are unit-normalised; the raw projection is what the layer holds
    assert torch.allclose(F.normalize(acts, dim=1), expected, atol=1e-5)
    result = CliRunner().invoke(app, ["evaluate", "ms", "--out", str(tmp_path / "bad.json"), "--raw-neurons",
                                      "--layer", "final", "--model", str(clip_dir), "--images",
                                      str(tmp_path / "images"), "--embedder", f"clip:{clip_dir}"])
    assert result.exit_code == 2 and "'last'" in result.output
