"""`vlm-steer steer` on a tiny LLaVA and a tiny SAE saved to disk."""

from __future__ import annotations

import pytest
import typer
from engine_fixtures import images, make_sae
from typer.testing import CliRunner

from sae_modules.formats import save_sae
from service.engine.cli import steer

app = typer.Typer()
app.command()(steer)
app.command("noop")(lambda: None)  # a second command keeps `steer` a sub-command, as in service.cli


@pytest.fixture(scope="module")
def paths(tiny_llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    image = root / "picture.png"
    images(1)[0].save(image)
    return {"model": str(tiny_llava_dir), "sae": str(save_sae(make_sae("batchtopk", 1), root / "sae")),
            "image": str(image)}


def invoke(paths, *args: str):
    return CliRunner().invoke(app, ["steer", "--model", paths["model"], "--sae", paths["sae"], "--image",
                                    paths["image"], "--prompt", "what is in the image?", "--max-tokens", "4", *args])


def test_steer_prints_both_answers_and_stats(paths):
    result = invoke(paths, "--pin", "3=40", "--nudge", "5=1.5", "--mul", "7=2", "--tokens", "patches")
    assert result.exit_code == 0, result.output
    for text in ("steered", "unsteered", "L0 (unedited)", "FVU (unedited)", "embedding cosine",
                 "latent 3 before → after", "→ 40.000", "latent 5", "latent 7"):
        assert text in result.output


def test_error_term_without_edits_answers_alike(paths):
    result = invoke(paths, "--error-term")
    assert result.exit_code == 0, result.output
    assert "1.0000" in result.output  # the embedding cosine of identical embeddings


@pytest.mark.parametrize("args,message", [
    (("--pin", "3"), "expected LATENT=VALUE"),
    (("--pin", "x=1"), "--pin"),
    (("--nudge", "3=nan"), "finite"),
    (("--pin", "999=1"), "latent 999 is out of range"),
    (("--pin", "3=1", "--tokens", "0,99"), "token indices [99] out of range"),
    (("--pin", "3=1", "--tokens", "some"), "--tokens"),
])
def test_bad_input_is_a_clear_error(paths, args, message):
    result = invoke(paths, *args)
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_missing_model_is_a_clear_error(paths, tmp_path):
    result = CliRunner().invoke(app, ["steer", "--model", str(tmp_path), "--sae", paths["sae"], "--image",
                                      paths["image"]])
    assert result.exit_code == 1
    assert "cannot load LLaVA model" in result.output


def test_defaults_to_the_shipped_demo_model(paths):
    """Without --model/--sae the CLI steers the demo LLaVA with its SAE (sae_modules.shapes)."""
    result = CliRunner().invoke(app, ["steer", "--image", paths["image"], "--pin", "5=30", "--max-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "latent 5 before → after" in result.output and "→ 30.000" in result.output
