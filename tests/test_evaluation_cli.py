"""`vlm-steer evaluate`: the whole chain on a tiny tower, SAE and embedder saved to disk, checked
against independent computations; file mode; reconstruction; clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sae_modules.activations.images import FolderImages
from sae_modules.activations.shards import ShardManifest, ShardWriter
from sae_modules.activations.towers import load_tower
from sae_modules.evaluation.cli import app
from sae_modules.formats.detect import load_sae
from sae_modules.formats.native import save_sae
from sae_modules.saes import build_sae
from sae_modules.saes.base import SAEConfig, SourceInfo
from sae_modules.shapes.label_tree import label_path
from sae_modules.shapes.world import write_folder
from tests import activations_fixtures as fx
from tests.test_ms import pairwise_ms

runner = CliRunner()
N_IMAGES = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("eval")
    attrs = write_folder(root / "images", N_IMAGES, seed=0)
    ids = FolderImages(root / "images").ids
    lines = ["image,path"] + [f"{i},{'/'.join(label_path(attrs[int(Path(i).stem)]))}" for i in ids]
    (root / "taxonomy.csv").write_text("\n".join(lines) + "\n")
    fx.clip_vision().save_pretrained(root / "tower")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=8)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    sae = build_sae(SAEConfig(architecture="matryoshka_batchtopk", d_in=32, n_latents=48, k=4, threshold=0.3,
                              group_sizes=[16, 32], source=SourceInfo(layer=1)))
    save_sae(sae, root / "sae")
    return {"root": root, "images": root / "images", "tower": root / "tower", "dino": root / "dino",
            "sae": root / "sae", "csv": root / "taxonomy.csv"}


def _invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_report_chain_matches_independent_computation(setup, tmp_path):
    out = tmp_path / "report"
    result = _invoke("report", "--out", out, "--sae", setup["sae"], "--model", setup["tower"], "--images",
                     setup["images"], "--embedder", f"dinov2:{setup['dino']}", "--taxonomy", setup["csv"],
                     "--top-k", "4", "--device", "cpu", "--service-url", "http://localhost:8000")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    # The paper's MS tables use the CLS token: the default pooling.
    assert report["n_images"] == N_IMAGES and report["n_latents"] == 48 and report["pooling"] == "cls"
    assert [(lvl["first_latent"], lvl["n_latents"]) for lvl in report["levels"]] == [(0, 16), (16, 32)]

    # the encoded activations are the SAE latents of the tower's block output at the CLS token
    tower, sae = load_tower(str(setup["tower"]), device="cpu"), load_sae(setup["sae"])
    images = FolderImages(setup["images"])
    pixels = tower.preprocess([images.load(i) for i in range(N_IMAGES)])
    with torch.no_grad():
        expected = sae.encode(tower.layer_output(pixels, 1))[:, 0]
    acts = torch.cat([load_file(f)["activations"] for f in sorted((out / "encoded").glob("activations-*"))])
    emb = load_file(out / "encoded" / "embeddings.safetensors")["embeddings"]
    assert torch.allclose(acts, expected, atol=1e-5)

    ms = json.loads((out / "ms.json").read_text())["ms"]
    reference = pairwise_ms(acts, emb)
    for got, want in zip(ms, reference):
        assert (got is None) == math.isnan(want)
        if got is not None:
            assert got == pytest.approx(want, abs=1e-5)
    live = [v for v in ms if v is not None]
    assert report["n_live"] == len(live) and report["ms_mean"] == pytest.approx(sum(live) / len(live))

    md = (out / "report.md").read_text()
    assert "Monosemanticity score" in md and "| 0 | 0-15 |" in md
    for name in ("ms_hist.png", "density_hist.png", "depth_hist.png", "browser/index.html"):
        assert (out / name).stat().st_size > 0
    page = (out / "browser" / "index.html").read_text()
    assert "http://localhost:8000" in page
    shown = json.loads(page.split('type="application/json">')[1].split("</script>")[0])["latents"]
    assert shown and len(list((out / "browser" / "grids").glob("*.png"))) == len(shown)


def test_taxonomy_command_reuses_the_encoded_directory(setup, tmp_path):
    out = tmp_path / "ms.json"
    result = _invoke("ms", "--out", out, "--sae", setup["sae"], "--model", setup["tower"], "--images",
                     setup["images"], "--embedder", f"dinov2:{setup['dino']}", "--device", "cpu")
    assert result.exit_code == 0, result.output
    encoded = tmp_path / "ms-encoded"
    result = _invoke("taxonomy", "--encoded", encoded, "--out", tmp_path / "tax.json", "--taxonomy", setup["csv"],
                     "--sae", setup["sae"], "--ms", out, "--top-k", "3")
    assert result.exit_code == 0, result.output
    body = json.loads((tmp_path / "tax.json").read_text())
    assert json.loads(out.read_text())["pooling"] == body["pooling"] == "cls" and body["layer"] == 1
    levels = body["levels"]
    assert [lvl["n_latents"] for lvl in levels] == [16, 32]
    # Recount: mean pairwise LCA depth of each latent's top 3 images (CSV paths), averaged per level.
    acts = torch.cat([load_file(f)["activations"] for f in sorted(encoded.glob("activations-*"))])
    ids = FolderImages(setup["images"]).ids
    rows = [line.split(",") for line in setup["csv"].read_text().splitlines()[1:]]
    paths = {image: tuple(path.split("/")) for image, path in rows}
    values, top = acts.topk(3, dim=0)
    for level, (start, size) in zip(levels, [(0, 16), (16, 32)]):
        depths = []
        for k in range(start, start + size):
            if values[-1, k] > 0:
                group = [paths[ids[int(i)]] for i in top[:, k]]
                pairs = [(a, b) for n, a in enumerate(group) for b in group[n + 1:]]
                depths.append(sum(next((d for d, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                                  for a, b in pairs) / len(pairs))
        assert level["n_scored"] == len(depths)
        assert level["depth"] == (pytest.approx(sum(depths) / len(depths)) if depths else None)
    assert any(level["depth"] is not None for level in levels), "no level scored: the check would be vacuous"


def test_raw_neurons_baseline_uses_the_layer_width(setup, tmp_path):
    out = tmp_path / "raw.json"
    result = _invoke("ms", "--out", out, "--raw-neurons", "--layer", "1", "--model", setup["tower"], "--images",
                     setup["images"], "--embedder", f"dinov2:{setup['dino']}", "--pooling", "cls", "--device", "cpu")
    assert result.exit_code == 0, result.output
    body = json.loads(out.read_text())
    assert body["n_latents"] == 32 and body["n_live"] == 32


def test_file_mode_writes_scores_with_null_for_undefined(tmp_path):
    gen = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(30, 5, generator=gen))
    acts[:, 0] = 0.0
    emb = torch.randn(30, 4, generator=gen)
    save_file({"activations": acts}, tmp_path / "a.safetensors")
    save_file({"embeddings": emb}, tmp_path / "e.safetensors")
    result = _invoke("ms", "--activations", tmp_path / "a.safetensors", "--embeddings", tmp_path / "e.safetensors",
                     "--out", tmp_path / "ms.json", "--hist", tmp_path / "ms.png", "--device", "cpu")
    assert result.exit_code == 0, result.output
    body = json.loads((tmp_path / "ms.json").read_text())
    assert body["ms"][0] is None and body["n_live"] == 4
    assert body["ms"][1:] == pytest.approx(pairwise_ms(acts, emb)[1:], abs=1e-5)
    assert {"mean", "std", "n_live"} <= body.keys() and (tmp_path / "ms.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "message"), [
    (["ms", "--out", "x.json", "--activations", "a.safetensors"], "needs --embeddings"),
    (["ms", "--out", "x.json", "--model", "m", "--images", ".", "--embedder", "e.safetensors"], "--sae and --raw-neurons"),
    (["ms", "--out", "x.json", "--pooling", "median"], "pooling"),
    (["ms", "--out", "x.json", "--activations", "missing.safetensors", "--embeddings", "e.safetensors"], "does not exist"),
    (["taxonomy", "--encoded", ".", "--out", "t.json"], "not an encoded-images directory"),
])
def test_bad_input_exits_with_a_clear_message(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = _invoke(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_reconstruction_metrics_match_a_hand_computation(setup, tmp_path):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 32, generator=gen) * 2 + 0.5
    manifest = ShardManifest(model="tiny", layer=1, tokens="all", d_in=32, images=["a"], seed=0)
    writer = ShardWriter(tmp_path / "shards", manifest, shard_size=20)
    writer.add(x, torch.zeros(50, dtype=torch.int64), torch.arange(50))
    writer.finish()
    from sae_modules.evaluation.reconstruction import reconstruction_metrics

    sae = load_sae(setup["sae"])
    got = reconstruction_metrics(sae, tmp_path / "shards", batch_size=16)
    with torch.no_grad():
        f = sae.encode(x)
        fvu = ((x - sae.decode(f)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert got["fvu"] == pytest.approx(float(fvu), rel=1e-5)
    assert got["l0"] == pytest.approx(float((f != 0).sum(1).double().mean()))
    assert got["dead_fraction"] == pytest.approx(float(((f != 0).sum(0) == 0).double().mean()))


def test_pooling_modes_reduce_tokens_per_image():
    from sae_modules.evaluation.encode import pool_tokens
    from sae_modules.evaluation.errors import EvaluationError

    latents = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [2.0, 2.0]]])          # [1 image, 3 tokens, 2 latents]
    assert pool_tokens(latents, "mean").tolist() == [[2.0, 2.0]]
    assert pool_tokens(latents, "max").tolist() == [[3.0, 4.0]]
    assert pool_tokens(latents, "cls").tolist() == [[1.0, 0.0]]
    with pytest.raises(EvaluationError) as err:
        pool_tokens(latents, "median")
    assert err.value.field == "pooling"
