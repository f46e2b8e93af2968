"""EleutherAI sparsify checkpoints, written and read by the `eai-sparsify` package itself: they load
(same file names as ours, told apart by content) with sparsify's own latents, training runs with
several hookpoints pick one by name, and `vlm-steer export --to sparsify` writes what sparsify loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae_modules import CheckpointError, SAEConfig, load_sae, save_sae
from sae_modules.formats import export_sparsify
from sae_modules.saes import build_sae
from service.cli import app

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU; the eager one is exact
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e '.[dev]')")
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.__main__ import RunConfig

D_IN, N, K = 8, 32, 4


def sparsify_sae(seed: int = 0, dtype: torch.dtype = torch.float32, **cfg: object) -> SparseCoder:
    """A SparseCoder with random (not initial) weights, so every tensor's orientation matters."""
    torch.manual_seed(seed)
    sae = SparseCoder(D_IN, SparseCoderConfig(k=K, num_latents=N, **cfg), dtype=dtype)
    with torch.no_grad():
        for tensor in sae.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.5)
    return sae


def sparsify_latents(sae: SparseCoder, x: torch.Tensor) -> torch.Tensor:
    """sparsify's own encode, scattered into a dense [B, N] tensor."""
    out = sae.encode(x.to(sae.dtype))
    return torch.zeros(x.shape[0], sae.num_latents).scatter_(1, out.top_indices, out.top_acts.float())


def test_checkpoint_written_by_sparsify_gives_its_latents(tmp_path: Path) -> None:
    theirs = sparsify_sae()
    theirs.save_to_disk(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    assert (ours.cfg.architecture, ours.cfg.d_in, ours.cfg.n_latents, ours.cfg.k) == ("topk", D_IN, N, K)
    x = torch.randn(16, D_IN)
    expected = sparsify_latents(theirs, x)
    assert ((expected != 0).sum(1) > 0).all()
    torch.testing.assert_close(ours.encode(x), expected, atol=1e-5, rtol=0)
    out = theirs.encode(x)
    torch.testing.assert_close(ours.decode(expected), theirs.decode(out.top_acts, out.top_indices), atol=1e-5, rtol=0)


def test_expansion_factor_sets_the_width_when_num_latents_is_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    SparseCoder(D_IN, SparseCoderConfig(k=K, expansion_factor=3)).save_to_disk(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["num_latents"] == 0
    assert load_sae(tmp_path / "sae").cfg.n_latents == 3 * D_IN


def test_bfloat16_checkpoint_loads_in_float32(tmp_path: Path) -> None:
    theirs = sparsify_sae(dtype=torch.bfloat16)
    theirs.save_to_disk(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    assert ours.W_enc.dtype == torch.float32
    assert torch.equal(ours.W_enc.data, theirs.encoder.weight.data.float().T)


def test_native_checkpoint_is_still_ours(tmp_path: Path) -> None:
    """Same two file names; the native cfg.json's format tag keeps our full config (incl. threshold)."""
    cfg = SAEConfig(architecture="batchtopk", d_in=D_IN, n_latents=N, k=K, threshold=0.3)
    sae = build_sae(cfg)
    save_sae(sae, tmp_path / "ours")
    assert load_sae(tmp_path / "ours").cfg == sae.cfg
    assert sae.cfg.threshold == pytest.approx(0.3)


def _training_run(root: Path, hookpoints: list[str]) -> dict[str, SparseCoder]:
    """What sparsify's Trainer.save writes: one folder per hookpoint plus the run's config.json."""
    saes = {name: sparsify_sae(seed=i) for i, name in enumerate(hookpoints)}
    for name, sae in saes.items():
        sae.save_to_disk(root / name)
    RunConfig(sae=SparseCoderConfig(k=K, num_latents=N), model="tiny/clip-vision", dataset="shapes",
              hookpoints=hookpoints).save_json(root / "config.json")
    torch.save({"global_step": 10}, root / "state.pt")
    return saes


def test_training_run_with_several_layers_is_read_by_hookpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    saes = _training_run(run, ["layers.0", "layers.1", "layers.2.mlp"])
    with pytest.raises(CheckpointError, match=r"3 SAE checkpoints.*layers\.0, layers\.1, layers\.2\.mlp"):
        load_sae(run)
    second = load_sae(run, subfolder="layers.1")
    assert second.cfg.source.layer == 1
    assert (second.cfg.source.model_id, second.cfg.source.dataset) == ("tiny/clip-vision", "shapes")
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(second.encode(x), sparsify_latents(saes["layers.1"], x), atol=1e-5, rtol=0)
    assert load_sae(run / "layers.2.mlp").cfg.source.layer is None, "an MLP output is not a block's output"
    loaded = SparseCoder.load_many(str(run), local=True)
    assert sorted(loaded) == ["layers.0", "layers.1", "layers.2.mlp"], "the fixture is a run sparsify reads"


def test_hookpoint_named_after_the_vision_tower_gives_its_block(tmp_path: Path) -> None:
    _training_run(tmp_path / "run", ["vision_tower.vision_model.encoder.layers.22"])
    sae = load_sae(tmp_path / "run" / "vision_tower.vision_model.encoder.layers.22")
    assert sae.cfg.source.layer == 22


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"transcode": True}, "transcoder"),
        ({"skip_connection": True}, "skip_connection"),
        ({"activation": "groupmax"}, "'groupmax' is not supported"),
    ],
)
def test_unsupported_sparsify_options_are_refused(tmp_path: Path, cfg: dict, message: str) -> None:
    sparsify_sae(**cfg).save_to_disk(tmp_path / "sae")
    with pytest.raises(CheckpointError, match=message):
        load_sae(tmp_path / "sae")


def test_damaged_sparsify_checkpoint(tmp_path: Path) -> None:
    sparsify_sae().save_to_disk(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg | {"num_latents": N + 1}))
    with pytest.raises(CheckpointError, match=r"'encoder\.weight'.*\[32, 8\].*needs \[33, 8\]"):
        load_sae(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({"d_out": 3}))
    with pytest.raises(CheckpointError, match="neither a vlm-steer config.*nor a sparsify one"):
        load_sae(tmp_path / "sae")


def _topk_sae(seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(architecture="topk", d_in=D_IN, n_latents=N, k=K))
    with torch.no_grad():
        for tensor in sae.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.5)
    return sae


def test_export_is_read_by_sparsify_with_our_latents(tmp_path: Path) -> None:
    ours = _topk_sae()
    export_sparsify(ours, tmp_path / "out")
    theirs = SparseCoder.load_from_disk(tmp_path / "out")
    x = torch.randn(16, D_IN)
    torch.testing.assert_close(sparsify_latents(theirs, x), ours.encode(x), atol=1e-5, rtol=0)
    back = load_sae(tmp_path / "out")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_export_command_to_sparsify(tmp_path: Path) -> None:
    save_sae(_topk_sae(), tmp_path / "ours")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "sparsify"])
    assert result.exit_code == 0, result.output
    assert "as sparsify" in result.output
    assert SparseCoder.load_from_disk(tmp_path / "out").num_latents == N


def test_export_of_a_threshold_sae_to_sparsify_is_refused(tmp_path: Path) -> None:
    cfg = SAEConfig(architecture="batchtopk", d_in=D_IN, n_latents=N, k=K, threshold=0.3)
    save_sae(build_sae(cfg), tmp_path / "ours")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "ours"), str(tmp_path / "out"), "--to", "sparsify"])
    assert result.exit_code == 2
    assert "batchtopk SAE cannot be written for sparsify" in result.output
    assert not (tmp_path / "out").exists()
