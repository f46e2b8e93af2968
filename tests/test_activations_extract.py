"""The extraction job end to end: token modes, sources, labels, resume after SIGKILL, bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from sae_modules.activations.cli import extract
from sae_modules.activations.errors import ExtractError
from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import DatasetImages, FolderImages
from sae_modules.activations.shards import iter_shards, read_manifest
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower
from tests import activations_fixtures as fx

N_PATCHES = fx.N_TOKENS - 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip")
    model = fx.clip_vision()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tower(model_dir):
    return load_tower(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    fx.write_images(root / "cat", 3, seed=1)
    fx.write_images(root / "dog", 2, seed=2)
    return root


def _reference_hidden(tower, source, layer: int) -> torch.Tensor:
    """Block output of every image, from transformers' own output_hidden_states."""
    pixels = tower.preprocess([source.load(i) for i in range(len(source.ids))])
    with torch.no_grad():
        return tower.module(pixel_values=pixels, output_hidden_states=True).hidden_states[layer + 1]


def _rows(out: Path) -> dict[str, torch.Tensor]:
    shards = list(iter_shards(out))
    return {k: torch.cat([s[k] for s in shards]) for k in ("activations", "image_index", "token_index")}


def _plan(model_dir, **kw) -> ExtractionPlan:
    return ExtractionPlan(
        **({"model": str(model_dir), "layer": 1, "tokens": TokenSelection.parse("all")} | kw)
    )


@pytest.mark.parametrize("spec", ["all", "cls", "patches", "mean", "random:3"])
def test_every_token_mode_matches_hidden_states(tower, model_dir, image_dir, tmp_path, spec):
    source = FolderImages(image_dir)
    plan = _plan(model_dir, tokens=TokenSelection.parse(spec), batch_size=2, shard_size=7, seed=5)
    manifest = run_extraction(tower, source, tmp_path, plan, progress=False)
    hidden = _reference_hidden(tower, source, layer=1)
    rows = _rows(tmp_path)

    per_image = {"all": fx.N_TOKENS, "cls": 1, "patches": N_PATCHES, "mean": 1, "random:3": 3}[spec]
    assert manifest.complete and manifest.count == 5 * per_image == len(rows["activations"])
    assert manifest.layer == 1 and manifest.tokens == spec and manifest.d_in == 32
    assert rows["image_index"].tolist() == [i for i in range(5) for _ in range(per_image)]
    tokens = rows["token_index"]
    if spec == "mean":
        assert (tokens == -1).all()
        expected = hidden[:, 1:].mean(dim=1)
    else:
        expected = hidden[rows["image_index"], tokens]
    torch.testing.assert_close(rows["activations"], expected, rtol=0, atol=1e-6)
    if spec == "cls":
        assert (tokens == 0).all()
    if spec == "patches":
        assert tokens.tolist() == list(range(1, fx.N_TOKENS)) * 5
    if spec == "random:3":
        picks = tokens.reshape(5, 3)
        assert ((picks >= 1) & (picks <= N_PATCHES)).all()
        assert all(len(set(p.tolist())) == 3 for p in picks)
        assert len({tuple(p.tolist()) for p in picks}) > 1  # not the same tokens for every image


def test_random_tokens_depend_on_seed_and_image_not_batching():
    random2 = TokenSelection.parse("random:2")
    hidden = torch.randn(4, fx.N_TOKENS, 3)
    _, _, whole = random2.select(hidden, [10, 11, 12, 13], seed=0)
    _, _, split = random2.select(hidden[2:], [12, 13], seed=0)
    assert whole[4:].tolist() == split.tolist()
    _, _, other_seed = random2.select(hidden, [10, 11, 12, 13], seed=1)
    assert whole.tolist() != other_seed.tolist()


def test_labels_come_from_class_subfolders(image_dir):
    source = FolderImages(image_dir)
    assert source.ids[0] == "cat/img000.png" and len(source.ids) == 5
    assert source.labels == ["cat"] * 3 + ["dog"] * 2


def test_flat_folder_has_no_labels(tmp_path):
    fx.write_images(tmp_path, 2)
    assert FolderImages(tmp_path).labels is None


def test_dataset_on_disk_gives_the_same_rows_as_its_images(tower, model_dir, image_dir, tmp_path):
    import datasets

    folder = FolderImages(image_dir)
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["cat", "dog"])})
    rows = {"img": [folder.load(i) for i in range(5)], "kind": [0, 0, 0, 1, 1]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds")
    source = DatasetImages(tmp_path / "ds", image_column="img", label_column="kind")
    assert source.ids == ["0", "1", "2", "3", "4"] and source.labels == folder.labels

    plan = _plan(model_dir, tokens=TokenSelection.parse("cls"))
    from_dataset = run_extraction(tower, source, tmp_path / "a", plan, progress=False)
    run_extraction(tower, folder, tmp_path / "b", plan, progress=False)
    assert from_dataset.labels == ["cat"] * 3 + ["dog"] * 2
    torch.testing.assert_close(_rows(tmp_path / "a")["activations"], _rows(tmp_path / "b")["activations"])

    with pytest.raises(ExtractError, match=r"column\(s\) \['image'\] not in"):
        DatasetImages(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.load_from_disk(tmp_path / "ds")}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ExtractError, match=r"--split: choose one of \['train'\]"):
        DatasetImages(tmp_path / "dd", image_column="img")
    assert len(DatasetImages(tmp_path / "dd", image_column="img", split="train").ids) == 5


KILLING_RUN = """
import os, signal, sys
from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import FolderImages
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower

model, images, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class KilledWhileReading(FolderImages):
    def load(self, index):
        if index == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load(index)

tokens = TokenSelection.parse("random:2")
plan = ExtractionPlan(model=model, layer=-2, tokens=tokens, batch_size=3, shard_size=5)
run_extraction(load_tower(model, device="cpu"), KilledWhileReading(images), out, plan, progress=False)
"""


def test_resume_after_sigkill_equals_an_uninterrupted_run(tower, model_dir, tmp_path):
    images = tmp_path / "images"
    fx.write_images(images, 20, seed=3)
    plan = _plan(model_dir, layer=-2, tokens=TokenSelection.parse("random:2"), batch_size=3, shard_size=5)
    reference = run_extraction(tower, FolderImages(images), tmp_path / "whole", plan, progress=False)

    out = tmp_path / "killed"
    script = tmp_path / "killing_run.py"
    script.write_text(textwrap.dedent(KILLING_RUN))
    root = Path(__file__).resolve().parents[1]
    killed = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(images), str(out), "14"],
        cwd=root,
        env={"PYTHONPATH": str(root)},
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    partial = read_manifest(out)
    assert not partial.complete and 1 <= len(partial.shards) < len(reference.shards)

    resumed = run_extraction(tower, FolderImages(images), out, plan, progress=False)
    assert resumed.model_dump() == reference.model_dump()  # same rows, boundaries and sha256s
    assert all(
        torch.equal(a, b)
        for a, b in zip(_rows(out).values(), _rows(tmp_path / "whole").values(), strict=True)
    )


def test_corrupted_shard_is_redone_on_rerun(tower, model_dir, image_dir, tmp_path):
    plan = _plan(model_dir, batch_size=2, shard_size=20)
    reference = run_extraction(tower, FolderImages(image_dir), tmp_path, plan, progress=False)
    assert run_extraction(tower, FolderImages(image_dir), tmp_path, plan, progress=False) == reference
    shard = tmp_path / reference.shards[2].file
    shard.write_bytes(shard.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.warns(UserWarning, match="shard-00002.safetensors is corrupted"):
        redone = run_extraction(tower, FolderImages(image_dir), tmp_path, plan, progress=False)
    assert redone == reference


def test_unreadable_image_is_skipped_with_a_warning(tower, model_dir, tmp_path):
    fx.write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "img001.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipping unreadable image img001.png"):
        manifest = run_extraction(
            tower,
            FolderImages(tmp_path / "imgs"),
            tmp_path / "out",
            _plan(model_dir, tokens=TokenSelection.parse("cls")),
            progress=False,
        )
    assert manifest.images == ["img000.png", "img001.png", "img002.png"]
    assert _rows(tmp_path / "out")["image_index"].tolist() == [0, 2]


def test_all_images_unreadable_is_an_error(tower, model_dir, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ExtractError, match="no image could be read"):
        run_extraction(
            tower, FolderImages(tmp_path / "imgs"), tmp_path / "out", _plan(model_dir), progress=False
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "{empty}"], "holds no image files"),
        (["--images", "{tmp}/nowhere"], "is not a directory"),
        (
            ["--images", "{images}", "--layer", "7"],
            "--layer: layer 7 is out of range for a tower of 3 blocks",
        ),
        (["--images", "{images}", "--tokens", "random:0"], "--tokens: 'random:0' is not a token selection"),
        (["--images", "{images}", "--tokens", "random:17"], "more than the tower's 16 patches"),
        (["--images", "{images}", "--dataset", "{tmp}"], "exactly one of --images DIR and --dataset PATH"),
        (["--dataset", "{empty}"], "is not a dataset saved with save_to_disk"),
        (["--images", "{images}", "--dtype", "int8"], "--dtype: 'int8' is not one of"),
        (["--images", "{images}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--images", "{images}", "--layer", "final"], "--layer: 'final' is neither a block index nor 'last'"),
        (["--images", "{images}", "--layer", "last", "--tokens", "mean"],
         "--tokens: the image embedding (--layer last) is one vector per image; mean picks patches"),
        (["--images", "{images}", "--layer", "last", "--tokens", "random:2"], "random:2 picks patches"),
    ],
)
def test_cli_bad_inputs_exit_with_a_clear_message(model_dir, image_dir, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    filled = [a.format(empty=tmp_path / "empty", tmp=tmp_path, images=image_dir) for a in args]
    if "--layer" not in filled:
        filled += ["--layer", "1"]
    app = typer.Typer()
    app.command()(extract)
    result = CliRunner().invoke(app, ["--model", str(model_dir), "--out", str(tmp_path / "out"), *filled])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_cli_extracts_and_a_different_rerun_is_refused(model_dir, image_dir, tmp_path):
    app = typer.Typer()
    app.command()(extract)
    base = ["--model", str(model_dir), "--images", str(image_dir), "--out", str(tmp_path), "--no-progress"]
    result = CliRunner().invoke(app, [*base, "--layer", "-2", "--tokens", "cls", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "5 vectors of dim 32 from 5 images in 1 shards" in result.output
    assert read_manifest(tmp_path).layer == 1 and _rows(tmp_path)["activations"].dtype == torch.bfloat16
    result = CliRunner().invoke(app, [*base, "--layer", "0", "--tokens", "cls", "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "differs in: layer" in result.output


def test_cli_extracts_the_image_embedding_one_vector_per_image(model_dir, image_dir, tmp_path):
    """`--layer last` needs no --tokens: each image's pooled output (this tower has no projection), CLS slot."""
    app = typer.Typer()
    app.command()(extract)
    result = CliRunner().invoke(app, ["--model", str(model_dir), "--images", str(image_dir), "--out", str(tmp_path),
                                      "--layer", "last", "--batch-size", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path)
    assert (manifest.layer, manifest.tokens, manifest.d_in, manifest.count) == ("last", "cls", 32, 5)
    rows = _rows(tmp_path)
    source = FolderImages(image_dir)
    model = fx.clip_vision()
    tower = load_tower(str(model_dir), device="cpu")
    with torch.no_grad():
        pooled = model(pixel_values=tower.preprocess([source.load(i) for i in range(5)])).pooler_output
    assert rows["image_index"].tolist() == list(range(5)) and rows["token_index"].tolist() == [0] * 5
    torch.testing.assert_close(rows["activations"], pooled, rtol=0, atol=1e-6)
