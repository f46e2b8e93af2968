"""SAELens checkpoints: every inference architecture, written by SAELens itself (`SAE.save_model`),
loads with the latents SAELens computes; unsupported options are refused; our export is what SAELens
reads (`SAE.load_from_disk`) and round-trips exactly. The reference is the installed `sae-lens`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from torch import Tensor
from typer.testing import CliRunner

from sae_modules import CheckpointError, SAEConfig, load_sae
from sae_modules.formats import export_saelens
from sae_modules.formats.cli import export
from sae_modules.saes import build_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[dev]')")

D_IN, D_SAE = 6, 20
ATOL = 1e-5


def random_weights(architecture: str, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.5) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    weights = {"W_enc": rand(D_IN, D_SAE), "W_dec": rand(D_SAE, D_IN, scale=1.0), "b_dec": rand(D_IN)}
    if architecture == "gated":
        return weights | {
            "b_gate": rand(D_SAE, scale=0.3),
            "b_mag": rand(D_SAE, scale=0.3),
            "r_mag": rand(D_SAE, scale=0.3),
        }
    weights["b_enc"] = rand(D_SAE, scale=0.3)
    if architecture == "jumprelu":
        weights["threshold"] = rand(D_SAE, scale=0.6)  # per latent, some negative
    return weights


def saelens_cfg(architecture: str, **fields: Any) -> dict[str, Any]:
    """A cfg.json as SAELens 6 writes it (SAE.save_model)."""
    return {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.12.1",
            "model_name": "openai/clip-vit-large-patch14-336",
            "hook_name": "blocks.22.hook_resid_post",
            "dataset_path": "imagenet",
        },
        **fields,
    }


def saved_by_saelens(path: Path, cfg: dict[str, Any], weights: dict[str, Tensor]):
    """SAELens' own module for `cfg` with `weights`, saved by its `save_model`; returns the module."""
    theirs = sae_lens.SAE.from_dict(cfg)
    theirs.load_state_dict(weights)
    theirs.save_model(str(path))
    return theirs.eval()


def saelens_reads(path: Path):
    return sae_lens.SAE.load_from_disk(str(path), device="cpu").eval()


def write_saelens(path: Path, cfg: dict[str, Any], weights: dict[str, Tensor]) -> Path:
    """Hand-written files, for configs SAELens 6 cannot write (damaged, refused or pre-6 ones)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, path / "sae_weights.safetensors")
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


CASES = {
    "standard": saelens_cfg("standard"),
    "standard-no-b_dec-on-input": saelens_cfg("standard", apply_b_dec_to_input=False),
    "topk": saelens_cfg("topk", k=4, rescale_acts_by_decoder_norm=False),
    "topk-rescaled": saelens_cfg("topk", k=4, rescale_acts_by_decoder_norm=True),
    "jumprelu": saelens_cfg("jumprelu"),
    "jumprelu-no-b_dec-on-input": saelens_cfg("jumprelu", apply_b_dec_to_input=False),
    "gated": saelens_cfg("gated"),
    "gated-no-b_dec-on-input": saelens_cfg("gated", apply_b_dec_to_input=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_gives_saelens_latents_and_reconstruction(tmp_path: Path, case: str) -> None:
    cfg = CASES[case]
    theirs = saved_by_saelens(tmp_path / case, cfg, random_weights(cfg["architecture"]))
    sae = load_sae(tmp_path / case)
    x = torch.randn(4, 7, D_IN) * 2
    with torch.no_grad():
        expected = theirs.encode(x)
        assert 0 < (expected != 0).float().mean() < 1, "the test input must exercise both branches"
        latents = sae.encode(x)
        torch.testing.assert_close(latents, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae.decode(latents), theirs.decode(expected), atol=ATOL, rtol=0)
    assert sae.cfg.source.model_id == "openai/clip-vit-large-patch14-336"
    assert sae.cfg.source.layer == 22
    assert sae.cfg.source.dataset == "imagenet"


def test_encode_subset_of_loaded_jumprelu_and_gated(tmp_path: Path) -> None:
    """The imported elementwise SAEs give the same few latents without a full encode."""
    latents = torch.tensor([0, 5, 19])
    x = torch.randn(9, D_IN)
    for architecture in ("jumprelu", "gated"):
        sae = load_sae(
            write_saelens(tmp_path / architecture, saelens_cfg(architecture), random_weights(architecture))
        )
        torch.testing.assert_close(
            sae.encode_subset(x, latents), sae.encode(x)[:, latents], atol=ATOL, rtol=0
        )


def test_pre_6_config_with_topk_activation_and_finetuning_scale(tmp_path: Path) -> None:
    """SAELens < 6 wrote flat configs: hook_point, activation_fn_str 'topk' + kwargs, and could save a
    finetuning scaling factor that multiplies latents before the decoder."""
    weights = random_weights("standard")
    scale = torch.rand(D_SAE) + 0.5
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "model_name": "gpt2",
        "hook_point": "blocks.3.hook_resid_pre",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "finetuning_scaling_factor": True,
        "sae_lens_training_version": "3.13.0",
    }
    sae = load_sae(write_saelens(tmp_path / "old", cfg, weights | {"scaling_factor": scale}))
    x = torch.randn(5, D_IN)
    # SAELens 6 itself fails to load this file (its TopKSAE has no finetuning_scaling_factor), so the
    # pre-6 TopK encode is written out: top 3 of relu((x - b_dec) W_enc + b_enc).
    hidden_pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    values, indices = hidden_pre.topk(3, dim=-1)
    expected = torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())
    torch.testing.assert_close(sae.encode(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        sae.decode(expected), (expected * scale) @ weights["W_dec"] + weights["b_dec"], atol=ATOL, rtol=0
    )
    assert (sae.cfg.architecture, sae.cfg.source.model_id, sae.cfg.source.layer) == ("topk", "gpt2", 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"normalize_activations": "expected_average_only_in"}, "needs the dataset norm scaling factor"),
        ({"normalize_activations": "layer_norm"}, "only 'none' is supported"),
        ({"reshape_activations": "hook_z"}, "attention-head outputs"),
        ({"architecture": "batchtopk"}, "training checkpoint"),
        ({"architecture": "transcoder"}, "'transcoder' is not supported"),
        ({"architecture": None}, "architecture None is not supported"),
        ({"d_sae": "many"}, "'d_sae' must be a positive integer"),
        ({"metadata": None, "sae_lens_version": "6.1.0"}, "no 'metadata' object"),
    ],
)
def test_refused_configs(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = write_saelens(tmp_path / "sae", saelens_cfg("standard") | change, random_weights("standard"))
    with pytest.raises(CheckpointError, match=message):
        load_sae(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda w: w.pop("b_enc"), r"missing tensor.*'b_enc'"),
        (lambda w: w.update(W_dec=w["W_dec"][:-2].contiguous()), r"'W_dec'.*\[18, 6\].*needs \[20, 6\]"),
        (lambda w: w["W_enc"].__setitem__((0, 0), float("inf")), "'W_enc' .* 1 NaN or infinite"),
        (lambda w: w.update(W_gate=torch.zeros(3)), "unexpected tensor.*'W_gate'"),
    ],
)
def test_damaged_weights(tmp_path: Path, damage: Any, message: str) -> None:
    weights = random_weights("standard")
    damage(weights)
    with pytest.raises(CheckpointError, match=message):
        load_sae(write_saelens(tmp_path / "sae", saelens_cfg("standard"), weights))


def test_truncated_weights_file(tmp_path: Path) -> None:
    path = write_saelens(tmp_path / "sae", saelens_cfg("standard"), random_weights("standard"))
    data = (path / "sae_weights.safetensors").read_bytes()
    (path / "sae_weights.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_sae(path)


OURS = {
    "relu": {},
    "topk": {"k": 4},
    "batchtopk": {"k": 4, "threshold": 0.3},
    "matryoshka_batchtopk": {"k": 4, "threshold": 0.3, "group_sizes": [5, 15]},
    "jumprelu": {},
    "gated": {},
}


def our_sae(architecture: str):
    torch.manual_seed(1)
    cfg = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        n_latents=D_SAE,
        source={"model_id": "openai/clip-vit-large-patch14-336", "layer": 22, "tokens": "random:2"},
        metrics={"fvu": 0.2},
        **OURS[architecture],
    )
    sae = build_sae(cfg)
    with torch.no_grad():
        for tensor in sae.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.5)
    return sae


@pytest.mark.parametrize("architecture", list(OURS))
def test_export_is_read_by_saelens_and_round_trips_exactly(tmp_path: Path, architecture: str) -> None:
    sae = our_sae(architecture)
    export_saelens(sae, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    for field in (
        "architecture",
        "d_in",
        "d_sae",
        "dtype",
        "device",
        "apply_b_dec_to_input",
        "normalize_activations",
        "reshape_activations",
        "metadata",
    ):
        assert field in cfg, field
    assert cfg["metadata"]["hook_name"] == "blocks.22.hook_resid_post"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    x = torch.randn(3, 5, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(saelens_reads(tmp_path / "out").encode(x), sae.encode(x), atol=ATOL, rtol=0)

    back = load_sae(tmp_path / "out")
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_batchtopk_exports_as_jumprelu_like_saelens(tmp_path: Path) -> None:
    export_saelens(our_sae("matryoshka_batchtopk"), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    threshold = load_file(tmp_path / "out" / "sae_weights.safetensors")["threshold"]
    assert cfg["architecture"] == "jumprelu"
    assert torch.equal(threshold, torch.full((D_SAE,), 0.3))
    assert cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["training_architecture_details"]["matryoshka_widths"] == [5, 20]


def test_foreign_checkpoint_survives_import_and_export(tmp_path: Path) -> None:
    theirs = saved_by_saelens(tmp_path / "theirs", CASES["topk-rescaled"], random_weights("topk"))
    export_saelens(load_sae(tmp_path / "theirs"), tmp_path / "again")
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(saelens_reads(tmp_path / "again").encode(x), theirs.encode(x), atol=ATOL, rtol=0)


def test_tampered_round_trip_metadata_is_refused(tmp_path: Path) -> None:
    export_saelens(our_sae("batchtopk"), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    cfg["metadata"]["vlm_steer_config"]["threshold"] = 0.9
    (tmp_path / "out" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="disagrees with the SAELens fields or weights"):
        load_sae(tmp_path / "out")


def test_untrained_batchtopk_has_nothing_to_export(tmp_path: Path) -> None:
    sae = build_sae(SAEConfig(architecture="batchtopk", d_in=D_IN, n_latents=D_SAE, k=2))
    with pytest.raises(CheckpointError, match="no inference threshold"):
        export_saelens(sae, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(export)
    return app


def test_cli_export_writes_saelens_layout(tmp_path: Path) -> None:
    src = write_saelens(tmp_path / "src", CASES["gated"], random_weights("gated"))
    result = CliRunner().invoke(cli(), ["--to", "saelens", str(src), str(tmp_path / "dst")])
    assert result.exit_code == 0, result.output
    assert "gated" in result.stdout
    torch.testing.assert_close(
        load_sae(tmp_path / "dst").encode(torch.ones(D_IN)),
        load_sae(src).encode(torch.ones(D_IN)),
        atol=0,
        rtol=0,
    )
    again = CliRunner().invoke(cli(), [str(src), str(tmp_path / "dst")])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert CliRunner().invoke(cli(), ["--overwrite", str(src), str(tmp_path / "dst")]).exit_code == 0


def test_cli_reports_a_bad_checkpoint_without_a_traceback(tmp_path: Path) -> None:
    weights = random_weights("standard")
    weights["W_enc"][1, 2] = float("nan")
    src = write_saelens(tmp_path / "src", saelens_cfg("standard"), weights)
    result = CliRunner().invoke(cli(), [str(src), str(tmp_path / "dst")])
    assert result.exit_code == 2
    assert "error:" in result.stderr and "'W_enc'" in result.stderr and "NaN" in result.stderr
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, CheckpointError)
    assert not (tmp_path / "dst").exists()


def test_cli_converts_a_foreign_checkpoint_to_ours(tmp_path: Path) -> None:
    src = write_saelens(tmp_path / "src", CASES["jumprelu"], random_weights("jumprelu"))
    result = CliRunner().invoke(cli(), ["--to", "native", str(src), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ours" / "sae.safetensors").is_file()
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(load_sae(tmp_path / "ours").encode(x), load_sae(src).encode(x), atol=0, rtol=0)


def test_topk_without_k_uses_saelens_default(tmp_path: Path) -> None:
    """TopKSAEConfig defaults k to 100, which this 20-latent SAE cannot hold."""
    with pytest.raises(CheckpointError, match="k=100 exceeds n_latents=20"):
        load_sae(write_saelens(tmp_path / "sae", saelens_cfg("topk"), random_weights("topk")))


def test_cli_reports_an_unwritable_destination_without_a_traceback(tmp_path: Path) -> None:
    src = write_saelens(tmp_path / "src", CASES["standard"], random_weights("standard"))
    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(cli(), [str(src), str(tmp_path / "a-file" / "dst")])
    assert result.exit_code == 1
    assert "error: could not read" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("architecture", ["jumprelu", "gated"])
def test_input_scale_folds_into_the_inference_only_saes(architecture: str) -> None:
    """An SAE for x / s, folded, takes raw x: both are positively homogeneous once biases and
    thresholds scale with the input."""
    sae = our_sae(architecture)
    x, scale = torch.randn(7, D_IN), 3.5
    expected = sae.encode(x / scale) * scale
    sae.fold_input_scale(scale)
    torch.testing.assert_close(sae.encode(x), expected, atol=ATOL, rtol=1e-5)
