"""The steering score end to end on the shapes world: the shipped LLaVA, SAE and CLIP judge through the
real CLI and `SteeringEngine`, and one latent's figure recomputed by hand from the CLIP's own towers;
and the stage-1-only rebuild (`--clip-only`) that produced the shipped CLIP, at toy size."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
from typer.testing import CliRunner

from sae_modules.evaluation.encode import EncodedDir
from sae_modules.evaluation.sources import ACTIVATIONS_KEY
from sae_modules.shapes import DEMO_CLIP_DIR, DEMO_MODEL_DIR, DEMO_SAE_DIR
from sae_modules.shapes.cli import app as shapes_app
from sae_modules.shapes.manifest import verify_manifest, write_manifest
from sae_modules.shapes.rebuild import rebuild
from sae_modules.shapes.recipe import Recipe
from sae_modules.shapes.world import write_folder

pytestmark = pytest.mark.slow

TOP_K = 4
N_LATENTS = 3


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, dict]:
    """`evaluate ms` (to find top images) then `evaluate steering` on 3 busy latents x 6 probe images."""
    from service.cli import app

    work = tmp_path_factory.mktemp("steer_shapes")
    write_folder(work / "images", 32, seed=11)
    write_folder(work / "probes", 6, seed=12)
    runner = CliRunner()
    common = ["--model", str(DEMO_MODEL_DIR), "--sae", str(DEMO_SAE_DIR), "--device", "cpu"]
    result = runner.invoke(
        app,
        [
            "evaluate",
            "ms",
            "--out",
            str(work / "ms.json"),
            "--images",
            str(work / "images"),
            "--embedder",
            f"clip:{DEMO_CLIP_DIR}",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    acts = _activations(work / "ms-encoded")
    busiest = (acts > 0).sum(dim=0).topk(N_LATENTS).indices.tolist()
    result = runner.invoke(
        app,
        [
            "evaluate",
            "steering",
            "--encoded",
            str(work / "ms-encoded"),
            "--clip",
            f"clip:{DEMO_CLIP_DIR}",
            "--probe-images",
            str(work / "probes"),
            "--latents",
            ",".join(map(str, busiest)),
            "--top-k",
            str(TOP_K),
            "--out",
            str(work / "steering.json"),
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    return work, json.loads((work / "steering.json").read_text())


def _activations(encoded: Path) -> torch.Tensor:
    data = EncodedDir.open(encoded)
    return torch.cat([load_file(encoded / name)[ACTIVATIONS_KEY] for name in data.info.activation_files])


def test_output_has_every_figure_and_they_are_finite(scored) -> None:
    _, body = scored
    assert body["n_images"] == 6 and body["value"] == 100.0 and len(body["latents"]) == N_LATENTS
    assert body["steered"]["n"] == N_LATENTS * 6 and body["unsteered"]["n"] == N_LATENTS * 6
    assert body["matched"]["n"] == 6 and body["shuffled"]["n"] == 6
    for name in ("steered", "unsteered", "matched", "shuffled"):
        assert math.isfinite(body[name]["mean"]) and -1 <= body[name]["mean"] <= 1, (name, body[name])
    for row in body["latents"]:
        assert len(row["answers"]) == 6 and all(math.isfinite(row[k]) for k in ("steered", "unsteered"))
    # The judge reads the world: an image is closer to its own label than to a shuffled one.
    assert body["matched"]["mean"] > body["shuffled"]["mean"]


@torch.no_grad()
def test_one_latent_equals_a_hand_computation_from_the_clip(scored) -> None:
    """Prototype = mean projected image embedding of the latent's top images (found here by topk over the
    encoded activations); figure = mean cosine with the projected text embedding of each answer word."""
    work, body = scored
    row = body["latents"][0]
    data = EncodedDir.open(work / "ms-encoded")
    column = _activations(work / "ms-encoded")[:, row["latent"]]
    top = column.topk(TOP_K)
    assert top.values[-1] > 0, "the chosen latent must fire on all its top images (no ties at zero)"
    clip = CLIPModel.from_pretrained(DEMO_CLIP_DIR).eval()
    pixels = AutoImageProcessor.from_pretrained(DEMO_CLIP_DIR)(
        images=[
            Image.open(Path(data.info.root) / data.info.ids[i]).convert("RGB") for i in top.indices.tolist()
        ],
        return_tensors="pt",
    )["pixel_values"]
    prototype = clip.get_image_features(pixel_values=pixels).pooler_output.mean(dim=0)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_CLIP_DIR)
    cosines = []
    for word in row["answers"]:
        tokens = tokenizer([f"{word} {tokenizer.eos_token}"], return_tensors="pt")
        text = clip.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output[0]
        cosines.append(float(F.cosine_similarity(prototype.double(), text.double(), dim=0)))
    assert row["steered"] == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)


def test_clip_only_reproduces_the_full_builds_clip_and_refuses_another_recipe(tmp_path) -> None:
    rebuild(tmp_path, Recipe.tiny(), eval_images=2, progress=False)
    built = {name: (tmp_path / "clip" / name).read_bytes() for name in ("model.safetensors", "config.json")}
    # Assets from before the CLIP was shipped: no clip/, and a manifest that does not list it.
    shutil.rmtree(tmp_path / "clip")
    record = json.loads((tmp_path / "MANIFEST.json").read_text())
    write_manifest(tmp_path, {k: v for k, v in record.items() if k not in ("files", "total_bytes")})
    runner = CliRunner()
    result = runner.invoke(shapes_app, ["--out", str(tmp_path), "--tiny", "--clip-only", "--no-progress"])
    assert result.exit_code == 0, result.output
    for name, data in built.items():
        assert (tmp_path / "clip" / name).read_bytes() == data, name
    manifest = verify_manifest(tmp_path)
    assert {"clip/model.safetensors", "clip/tokenizer.json", "clip/preprocessor_config.json"} <= set(
        manifest["files"]
    )
    assert manifest["clip_rebuild"]["command"].endswith("--clip-only")
    result = runner.invoke(shapes_app, ["--out", str(tmp_path), "--tiny", "--seed", "1", "--clip-only"])
    assert result.exit_code == 2 and "recipe" in result.output
