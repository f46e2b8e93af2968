"""The paper's SAEs as its scripts publish them: written here by dictionary_learning's own `trainSAE`
(the library the paper trained with, `pip install dictionary-learning`), in its exact layout
(`trainer_<i>/config.json`, `trainer_<i>/ae.pt`, `trainer_<i>/checkpoints/ae_<step>.pt`), with the
paper script's empty `layer`/`lm_name`, and loaded through every command that takes an SAE.

Latents are compared with the library's own `from_pretrained(...).encode`, not a re-typed copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sae_modules import CheckpointError, load_sae
from sae_modules.activations.images import FolderImages
from sae_modules.shapes.label_tree import label_path
from sae_modules.shapes.world import write_folder
from service.cli import app
from service.config import load_settings
from service.serve_cli import run_app, wait_ready
from tests import activations_fixtures as fx
from tests.ray_app import local_serve
from tests.service_fixtures import data_url, noise_image
from tests.test_evaluation_steering import clip_dir  # noqa: F401 (a CLIP with a text tower, as a fixture)

pytest.importorskip("dictionary_learning", reason="dictionary-learning is not installed (pip install -e '.[dev]')")
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE, BatchTopKTrainer
from dictionary_learning.trainers.matryoshka_batch_top_k import (
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKTrainer,
)
from dictionary_learning.training import trainSAE

D_IN, N, K, STEPS, SAVE_STEP = 32, 64, 4, 30, 20  # d_in = the tiny towers' width
LAYER = 1  # the tiny LLaVA's projector reads block 1 of 3 (vision_feature_layer=-2)
runner = CliRunner()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`trainSAE(save_dir=run)` with a BatchTopK (trainer_0) and a Matryoshka BatchTopK (trainer_1)
    trainer, configured as the paper's sae_train.py does (layer, lm_name, submodule_name all ""), on
    activations with a large mean so the save-time bias rescaling matters. `vendored/trainer_0` is
    trainer_1 as the paper repository's vendored copy records it: class names spelled "Matroyshka"."""
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(0)
    activations = [torch.randn(64, D_IN) * 3 + 1 for _ in range(STEPS)]
    common = {"activation_dim": D_IN, "dict_size": N, "k": K, "steps": STEPS, "layer": "", "lm_name": "",
              "submodule_name": "", "device": "cpu", "warmup_steps": 2, "threshold_start_step": 5}
    trainers = [{"trainer": BatchTopKTrainer, **common},
                {"trainer": MatryoshkaBatchTopKTrainer, "group_fractions": [0.25, 0.75], **common}]
    trainSAE(activations, trainers, steps=STEPS, save_steps=[0, SAVE_STEP], save_dir=str(root / "run"),
             normalize_activations=True, device="cpu")
    vendored = shutil.copytree(root / "run" / "trainer_1", root / "vendored" / "trainer_0")
    config = json.loads((vendored / "config.json").read_text())
    config["trainer"] |= {"dict_class": "MatroyshkaBatchTopKSAE", "trainer_class": "MatroyshkaBatchTopKTrainer"}
    (vendored / "config.json").write_text(json.dumps(config, indent=4))
    return root


def reference(path: Path):
    """The library's own module for a checkpoint file, as its README loads one."""
    state = torch.load(path, weights_only=True)
    return (MatryoshkaBatchTopKSAE if "group_sizes" in state else BatchTopKSAE).from_pretrained(path)


CHECKPOINTS = {
    "batchtopk step file": "run/trainer_0/checkpoints/ae_20.pt",
    "batchtopk final": "run/trainer_0/ae.pt",
    "matryoshka step file": "run/trainer_1/checkpoints/ae_20.pt",
    "matryoshka final": "run/trainer_1/ae.pt",
    "matroyshka spelling": "vendored/trainer_0/checkpoints/ae_20.pt",
}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_file_gives_the_library_latents(release: Path, name: str) -> None:
    path = release / CHECKPOINTS[name]
    ours, theirs = load_sae(path), reference(path)
    x = torch.randn(32, D_IN) * 3 + 1
    with torch.no_grad():
        expected = theirs.encode(x)
        assert 0 < (expected != 0).float().mean() < 1, "the input must exercise both sides of θ"
        torch.testing.assert_close(ours.encode(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(expected), theirs.decode(expected), atol=1e-5, rtol=1e-5)
    assert ours.cfg.architecture == ("batchtopk" if "batchtopk" in name else "matryoshka_batchtopk")
    assert (ours.cfg.k, ours.cfg.threshold) == (K, pytest.approx(float(theirs.threshold)))
    assert (ours.cfg.source.layer, ours.cfg.source.model_id) == (None, None), "the paper's config records none"
    if ours.cfg.group_sizes is not None:
        assert ours.cfg.group_sizes == [16, 48]


def _same_weights(a, b) -> bool:
    return all(torch.equal(a.state_dict()[name], t) for name, t in b.state_dict().items())


def test_trainer_folder_is_its_final_ae(release: Path) -> None:
    trainer = release / "run" / "trainer_0"
    assert _same_weights(load_sae(trainer), load_sae(trainer / "ae.pt"))
    assert not _same_weights(load_sae(trainer), load_sae(trainer / "checkpoints" / "ae_20.pt"))


def test_checkpoints_folder_and_a_trainer_without_final_ae_give_the_latest_step(release: Path, tmp_path) -> None:
    """A release that ships only `checkpoints/ae_<step>.pt` (ae_0.pt has no θ yet) reads the latest step."""
    trainer = shutil.copytree(release / "run" / "trainer_0", tmp_path / "trainer_0")
    (trainer / "ae.pt").unlink()
    latest = load_sae(trainer / "checkpoints" / "ae_20.pt")
    assert _same_weights(load_sae(trainer), latest)
    assert _same_weights(load_sae(trainer / "checkpoints"), latest)


def test_run_folder_names_its_trainers(release: Path) -> None:
    with pytest.raises(CheckpointError, match="2 SAE checkpoints in sub-folders.*: trainer_0, trainer_1$"):
        load_sae(release / "run")
    assert load_sae(release / "run", subfolder="trainer_1").cfg.architecture == "matryoshka_batchtopk"


def test_checkpoint_saved_before_theta_was_learned_is_refused(release: Path) -> None:
    with pytest.raises(CheckpointError, match="ae_0.pt: threshold is -1.0.*no inference threshold"):
        load_sae(release / "run" / "trainer_0" / "checkpoints" / "ae_0.pt")


def test_export_command_takes_the_file_and_saelens_reads_the_result(release: Path, tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[dev]')")
    path = release / CHECKPOINTS["matroyshka spelling"]
    result = runner.invoke(app, ["export", str(path), str(tmp_path / "saelens")])
    assert result.exit_code == 0, result.output
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    x = torch.randn(16, D_IN) * 3 + 1
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), reference(path).encode(x), atol=1e-5, rtol=1e-5)


# --- the commands that steer or measure need the layer, which the paper's config leaves empty ---------


def test_steer_command(release: Path, tiny_llava_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "image.png"
    noise_image(0).save(image)
    args = ["steer", "--model", str(tiny_llava_dir), "--sae", str(release / CHECKPOINTS["batchtopk step file"]),
            "--image", str(image), "--pin", "3=20", "--max-tokens", "3"]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 2
    assert "does not record its layer" in missing.output and "--layer" in missing.output
    assert "Traceback" not in missing.output
    result = runner.invoke(app, [*args, "--layer", str(LAYER)])
    assert result.exit_code == 0, result.output
    assert "steered" in result.output and "latent 3 before → after" in result.output


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny CLIP tower (width 32), a tiny DINOv2 embedder, 12 shapes images and their taxonomy."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("paper_eval")
    attrs = write_folder(root / "images", 12, seed=0)
    lines = ["image,path"] + [f"{i},{'/'.join(label_path(attrs[int(Path(i).stem)]))}"
                              for i in FolderImages(root / "images").ids]
    (root / "taxonomy.csv").write_text("\n".join(lines) + "\n")
    fx.clip_vision().save_pretrained(root / "tower")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=8)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return {"images": root / "images", "tower": root / "tower", "dino": root / "dino", "csv": root / "taxonomy.csv"}


@pytest.mark.parametrize("command", ["ms", "report"])  # ms, then taxonomy on its output
def test_evaluate_commands(release: Path, eval_world: dict[str, Path], tmp_path: Path, command: str) -> None:
    out = tmp_path / ("ms.json" if command == "ms" else "report")
    args = ["evaluate", command, "--out", str(out), "--sae", str(release / CHECKPOINTS["matroyshka spelling"]),
            "--model", str(eval_world["tower"]), "--images", str(eval_world["images"]),
            "--embedder", f"dinov2:{eval_world['dino']}", "--device", "cpu"]
    missing = runner.invoke(app, args)
    assert missing.exit_code != 0
    assert "records no layer" in missing.output and "--layer" in missing.output
    assert "Traceback" not in missing.output
    result = runner.invoke(app, [*args, "--layer", str(LAYER)])
    assert result.exit_code == 0, result.output
    body = json.loads((out if command == "ms" else out / "report.json").read_text())
    assert body["n_latents"] == N
    if command == "ms":  # taxonomy reads the Matryoshka levels from the same checkpoint file
        result = runner.invoke(app, ["evaluate", "taxonomy", "--encoded", str(tmp_path / "ms-encoded"),
                                     "--out", str(tmp_path / "tax.json"), "--taxonomy", str(eval_world["csv"]),
                                     "--sae", args[args.index("--sae") + 1], "--ms", str(out), "--top-k", "3"])
        assert result.exit_code == 0, result.output
        levels = json.loads((tmp_path / "tax.json").read_text())["levels"]
        assert [level["n_latents"] for level in levels] == [16, 48]


def test_evaluate_steering_command(release: Path, tiny_llava_dir: Path, clip_dir: Path,  # noqa: F811 (fixture)
                                   tmp_path: Path) -> None:
    """`evaluate ms` on the tiny LLaVA's tower gives the top images, then `evaluate steering` pins the
    paper checkpoint's latents inside that LLaVA: the layer comes from --layer on both."""
    sae = str(release / CHECKPOINTS["batchtopk step file"])
    write_folder(tmp_path / "images", 8, seed=3)
    write_folder(tmp_path / "probes", 1, seed=4)
    result = runner.invoke(app, ["evaluate", "ms", "--out", str(tmp_path / "ms.json"), "--sae", sae, "--model",
                                 str(tiny_llava_dir), "--images", str(tmp_path / "images"), "--embedder",
                                 f"clip:{clip_dir}", "--device", "cpu", "--layer", str(LAYER)])
    assert result.exit_code == 0, result.output
    steering = ["evaluate", "steering", "--encoded", str(tmp_path / "ms-encoded"), "--clip", f"clip:{clip_dir}",
                "--model", str(tiny_llava_dir), "--sae", sae, "--probe-images", str(tmp_path / "probes"),
                "--latents", "0,1", "--top-k", "2", "--out", str(tmp_path / "steer.json"), "--device", "cpu"]
    missing = runner.invoke(app, steering)
    assert missing.exit_code == 2 and "--layer" in missing.output, missing.output
    assert len(missing.output.strip().splitlines()) == 1, missing.output
    result = runner.invoke(app, [*steering, "--layer", str(LAYER)])
    assert result.exit_code == 0, result.output
    body = json.loads((tmp_path / "steer.json").read_text())
    assert [latent["latent"] for latent in body["latents"]] == [0, 1] and body["steered"]["n"] == 2


def _serve_config(tmp_path: Path, model: Path, sae: Path, layer: int | None) -> Path:
    entry = {"path": str(sae)} | ({} if layer is None else {"layer": layer})
    config = {"model": {"id": "tiny", "path": str(model)}, "saes": {"paper": entry},
              "ingress": {"num_cpus": 0.25}, "steerer": {"num_cpus": 0.25}}
    path = tmp_path / f"serve-{layer}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_serve_without_the_registry_layer_says_what_to_set(release: Path, tiny_llava_dir: Path,
                                                           tmp_path: Path) -> None:
    config = _serve_config(tmp_path, tiny_llava_dir, release / CHECKPOINTS["batchtopk step file"], None)
    result = runner.invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2
    assert "saes.paper.layer" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.slow
def test_serve_steers_with_the_checkpoint_file_and_the_registry_layer(release: Path, tiny_llava_dir: Path,
                                                                       tmp_path: Path) -> None:
    """`vlm-steer serve --config` with the registry's `layer`: the real Ray Serve app answers over HTTP."""
    settings = load_settings(_serve_config(tmp_path, tiny_llava_dir, release / CHECKPOINTS["batchtopk step file"],
                                           LAYER))
    body = {"prompt": "describe the image .", "image": data_url(noise_image(0)), "types": ["STEERED", "DEFAULT"],
            "max_tokens": 4, "interventions": [{"latent": 3, "mode": "pin", "value": 20.0}]}
    with local_serve() as base:
        run_app(settings)
        wait_ready(base, 300)
        response = httpx.post(f"{base}/v1/steer", json=body, timeout=120)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["sae"] == "paper"
    change = data["metrics"]["sae"]["latents"][0]
    assert change["latent"] == 3 and change["after"] == pytest.approx(20.0)


def test_hub_path_to_one_checkpoint_file(release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`owner/repo/trainer_0/checkpoints/ae_20.pt` fetches that file and its config, not every step: the
    patterns go through huggingface_hub's own filter over the release's files, then the id loads from
    a Hub cache laid out as huggingface_hub writes it (offline)."""
    import huggingface_hub.constants
    from huggingface_hub.utils import filter_repo_objects

    from sae_modules.formats.detect import hub_allow_patterns

    files = sorted(p.relative_to(release / "run").as_posix() for p in (release / "run").rglob("*") if p.is_file())
    fetched = list(filter_repo_objects(files, allow_patterns=hub_allow_patterns("trainer_0/checkpoints/ae_20.pt")))
    assert sorted(fetched) == ["trainer_0/checkpoints/ae_20.pt", "trainer_0/config.json"]

    commit = "0" * 40
    repo = tmp_path / "cache" / "models--paper--saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(release / "run", repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    local = load_sae(release / "run" / "trainer_0" / "checkpoints" / "ae_20.pt")
    assert _same_weights(load_sae("paper/saes/trainer_0/checkpoints/ae_20.pt"), local)
