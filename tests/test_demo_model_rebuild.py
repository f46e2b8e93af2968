"""`make demo-model`'s pipeline at toy size: it runs end to end, is deterministic, and its manifest is true."""

from __future__ import annotations

import hashlib
import json

from typer.testing import CliRunner

from sae_modules.formats.detect import load_sae
from sae_modules.shapes.build import rebuild
from sae_modules.shapes.cli import app
from sae_modules.shapes.manifest import ManifestError, verify_manifest
from sae_modules.shapes.recipe import Recipe
from sae_modules.shapes.stage_sae import SAE_LAYER


def test_tiny_rebuild_is_deterministic_and_manifest_is_true(tmp_path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    result = CliRunner().invoke(app, ["--out", str(first), "--tiny", "--eval-images", "4", "--no-progress",
                                      "--examples", str(tmp_path / "examples")])  # fmt: skip
    assert result.exit_code == 0, result.output
    rebuild(second, Recipe.tiny(), eval_images=4, progress=False)

    manifest = json.loads((first / "MANIFEST.json").read_text())
    for name, entry in manifest["files"].items():
        data = (first / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "sae/cfg.json",
            "sae/sae.safetensors"} <= set(manifest["files"])  # fmt: skip
    assert manifest["total_bytes"] == sum(e["bytes"] for e in manifest["files"].values())
    assert manifest["command"] == "make demo-model" and manifest["seed"] == 0
    assert set(manifest["accuracy"]) >= {"colour", "shape", "one_word", "describe"}
    assert (tmp_path / "examples" / "red_circle.png").is_file()

    for name in ("model/model.safetensors", "sae/sae.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    sae = load_sae(first / "sae")
    assert sae.cfg.architecture == "matryoshka_batchtopk"
    assert sae.cfg.d_in == Recipe.tiny().vision["hidden_size"]
    assert verify_manifest(first)["seed"] == 0


def test_tampered_artifact_is_caught(tmp_path) -> None:
    rebuild(tmp_path, Recipe.tiny(seed=1), eval_images=2, progress=False)
    (tmp_path / "sae" / "cfg.json").write_text("{}")
    try:
        verify_manifest(tmp_path)
    except ManifestError as err:
        assert "sae/cfg.json" in str(err)
    else:
        raise AssertionError("a modified file passed verification")


def test_sae_layer_is_the_projector_input() -> None:
    assert SAE_LAYER == -2
