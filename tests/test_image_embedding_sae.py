"""An SAE on the image embedding (`--layer last`, the layer of the paper's iNaturalist rows) end to end, through
the CLI: extracted, trained, its recorded layer used by `evaluate ms`, and refused by whatever steers inside the
tower, which the embedding comes after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae_modules.activations.images import FolderImages
from sae_modules.activations.shards import read_manifest
from sae_modules.activations.towers import load_tower
from sae_modules.evaluation.encode import EncodedDir
from sae_modules.formats import CheckpointError, load_sae
from sae_modules.train.trainer import FINAL_SAE
from service.assets import check_layers
from service.cli import app
from tests import activations_fixtures as fx


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessor

    root = tmp_path_factory.mktemp("last")
    fx.clip_model().save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    for label, seed in (("a", 1), ("b", 2)):
        fx.write_images(root / "images" / label, 24, seed=seed)
    runner = CliRunner()
    result = runner.invoke(app, ["extract", "--model", str(root / "clip"), "--images", str(root / "images"),
                                 "--layer", "last", "--out", str(root / "shards"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--shards", str(root / "shards"), "--out", str(root / "run"),
                                 "--architecture", "batchtopk", "--n-latents", "32", "--k", "2", "--batch-size", "16",
                                 "--steps", "20", "--lr", "1e-2", "--warmup-steps", "2", "--threshold-start-step", "2",
                                 "--holdout-shards", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return root


def test_the_sae_records_the_image_embedding_it_was_trained_on(run):
    manifest = read_manifest(run / "shards")
    assert (manifest.layer, manifest.tokens, manifest.d_in, manifest.count) == ("last", "cls", 16, 48)
    sae = load_sae(run / "run" / FINAL_SAE)
    assert sae.cfg.source.layer == "last" and sae.d_in == 16


def test_evaluate_ms_reads_the_layer_the_sae_records(run):
    """No --layer: the chain takes 'last' from the SAE and encodes each image's projected embedding."""
    from transformers import CLIPModel

    sae_dir = run / "run" / FINAL_SAE
    result = CliRunner().invoke(app, ["evaluate", "ms", "--out", str(run / "ms.json"), "--sae", str(sae_dir),
                                      "--model", str(run / "clip"), "--images", str(run / "images"),
                                      "--embedder", f"clip:{run / 'clip'}", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    body = json.loads((run / "ms.json").read_text())
    assert body["layer"] == "last" and body["n_latents"] == 32 and body["n_images"] == 48
    data = EncodedDir.open(run / "ms-encoded")
    codes = torch.cat([load_file(data.path / f)["activations"] for f in data.info.activation_files])
    clip, source = CLIPModel.from_pretrained(run / "clip").eval(), FolderImages(run / "images")
    pixels = load_tower(str(run / "clip"), device="cpu").preprocess([source.load(i) for i in range(48)])
    with torch.no_grad():
        embeds = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        expected = load_sae(sae_dir).eval().encode(embeds)
    torch.testing.assert_close(codes, expected, rtol=0, atol=1e-5)


def test_steering_refuses_an_sae_on_the_image_embedding_before_loading_a_model(run, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "steering", "--encoded", str(run / "ms-encoded"),
                                      "--clip", f"clip:{run / 'clip'}", "--model", str(tmp_path / "no-such-model"),
                                      "--sae", str(run / "run" / FINAL_SAE), "--probe-images", str(run / "images"),
                                      "--out", str(tmp_path / "steer.json"), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "image embedding ('last')" in result.output and "no-such-model" not in result.output


def test_serving_refuses_an_sae_on_the_image_embedding_before_any_replica_starts(run):
    with pytest.raises(CheckpointError, match=r"image embedding \('last'\), which LLaVA never reads"):
        check_layers({"emb": str(run / "run" / FINAL_SAE)}, {})


def test_evaluate_report_on_the_image_embedding(run, tmp_path):
    """The full report (MS, depth, reconstruction on the shards) names the layer it measured."""
    result = CliRunner().invoke(app, ["evaluate", "report", "--out", str(tmp_path), "--sae", str(run / "run" / FINAL_SAE),
                                      "--model", str(run / "clip"), "--images", str(run / "images"),
                                      "--embedder", f"clip:{run / 'clip'}", "--shards", str(run / "shards"),
                                      "--taxonomy", "folders", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["layer"] == "last" and report["n_images"] == 48
    assert 0 <= report["reconstruction"]["fvu"] < 1
