"""Our checkpoint format: exact round trips, atomic and safe overwrites, and a specific
CheckpointError for every kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_modules import CheckpointError, SAEConfig, load_sae, save_sae
from sae_modules.atomic_file import sha256_file
from sae_modules.formats import native
from sae_modules.formats.writing import write_checkpoint_dir
from sae_modules.saes import build_sae

D_IN, N = 8, 24

CONFIGS = {
    "relu": {},
    "topk": {"k": 3},
    "batchtopk": {"k": 3, "threshold": 0.25},
    "matryoshka_batchtopk": {"k": 3, "threshold": 0.25, "group_sizes": [4, 8, 12]},
    "jumprelu": {},
    "gated": {},
}


def random_sae(architecture: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        n_latents=N,
        source={"model_id": "tiny/clip", "layer": -2, "tokens": "random:2", "dataset": "shapes"},
        metrics={"fvu": 0.125},
        **CONFIGS[architecture],
    )
    sae = build_sae(cfg)
    with torch.no_grad():
        for tensor in sae.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.5)
    return sae


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_round_trip_is_exact(tmp_path: Path, architecture: str) -> None:
    sae = random_sae(architecture)
    save_sae(sae, tmp_path / "ckpt")
    back = load_sae(tmp_path / "ckpt")
    assert type(back) is type(sae)
    assert back.cfg == sae.cfg
    assert back.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    x = torch.randn(2, 5, D_IN)
    assert torch.equal(back.encode(x), sae.encode(x))
    assert (back.encode(x) != 0).any()


def test_cfg_json_records_version_and_weights_hash(tmp_path: Path) -> None:
    save_sae(random_sae("batchtopk"), tmp_path / "ckpt")
    header = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert header["format_version"] == native.FORMAT_VERSION
    assert header["weights_sha256"] == sha256_file(tmp_path / "ckpt" / "sae.safetensors")
    assert header["config"]["architecture"] == "batchtopk"
    assert header["config"]["threshold"] == pytest.approx(0.25)


def test_overwrite_replaces_checkpoint_and_leaves_no_temporaries(tmp_path: Path) -> None:
    save_sae(random_sae("relu", seed=1), tmp_path / "ckpt")
    newer = random_sae("topk", seed=2)
    save_sae(newer, tmp_path / "ckpt")
    assert load_sae(tmp_path / "ckpt").cfg == newer.cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["cfg.json", "sae.safetensors"]


def test_refuses_to_overwrite_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match=r"refusing to overwrite .*thesis\.tex"):
        save_sae(random_sae("relu"), tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


def _rewrite_weights(ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weights and re-record their hash, so the damage reaches the tensor checks."""
    save_file(tensors, ckpt / "sae.safetensors")
    header = json.loads((ckpt / "cfg.json").read_text())
    header["weights_sha256"] = sha256_file(ckpt / "sae.safetensors")
    (ckpt / "cfg.json").write_text(json.dumps(header))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    save_sae(random_sae("jumprelu"), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_changed_weights_fail_the_hash_check(ckpt: Path) -> None:
    data = bytearray((ckpt / "sae.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (ckpt / "sae.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        load_sae(ckpt)


def test_truncated_weights(ckpt: Path) -> None:
    data = (ckpt / "sae.safetensors").read_bytes()
    (ckpt / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_sae(ckpt)


def test_missing_tensor(ckpt: Path) -> None:
    tensors = load_file(ckpt / "sae.safetensors")
    del tensors["threshold"]
    _rewrite_weights(ckpt, tensors)
    with pytest.raises(CheckpointError, match="missing tensor.*'threshold'"):
        load_sae(ckpt)


def test_shape_disagrees_with_cfg(ckpt: Path) -> None:
    tensors = load_file(ckpt / "sae.safetensors")
    tensors["W_enc"] = tensors["W_enc"][:, :-1].contiguous()
    _rewrite_weights(ckpt, tensors)
    with pytest.raises(CheckpointError, match=r"'W_enc'.*shape \[8, 23\].*needs \[8, 24\]"):
        load_sae(ckpt)


def test_nan_weights(ckpt: Path) -> None:
    tensors = load_file(ckpt / "sae.safetensors")
    tensors["W_dec"][3, 1] = float("nan")
    _rewrite_weights(ckpt, tensors)
    with pytest.raises(CheckpointError, match="'W_dec'.*1 NaN"):
        load_sae(ckpt)


def test_unexpected_tensor(ckpt: Path) -> None:
    tensors = load_file(ckpt / "sae.safetensors") | {"extra": torch.zeros(2)}
    _rewrite_weights(ckpt, tensors)
    with pytest.raises(CheckpointError, match="unexpected tensor.*'extra'"):
        load_sae(ckpt)


def test_invalid_config_names_the_field(ckpt: Path) -> None:
    header = json.loads((ckpt / "cfg.json").read_text())
    header["config"]["n_latents"] = -4
    (ckpt / "cfg.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="n_latents"):
        load_sae(ckpt)


def test_config_that_is_not_json(ckpt: Path) -> None:
    (ckpt / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_sae(ckpt)


def test_newer_format_version(ckpt: Path) -> None:
    header = json.loads((ckpt / "cfg.json").read_text())
    header["format_version"] = native.FORMAT_VERSION + 1
    (ckpt / "cfg.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="upgrade"):
        load_sae(ckpt)


def test_unknown_directory_lists_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no SAE checkpoint .*model\.bin"):
        load_sae(tmp_path)


def test_sub_folders(tmp_path: Path) -> None:
    first, second = random_sae("relu", seed=1), random_sae("topk", seed=2)
    save_sae(first, tmp_path / "release" / "layer_11")
    save_sae(second, tmp_path / "release" / "layer_22")
    with pytest.raises(CheckpointError, match="layer_11, layer_22"):
        load_sae(tmp_path / "release")
    assert load_sae(tmp_path / "release", subfolder="layer_22").cfg == second.cfg


def _offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_hub_id_is_read_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id goes through snapshot_download; here it finds the repo in a local cache laid out as
    huggingface_hub writes it (no network on this machine)."""
    commit = "0" * 40
    repo = tmp_path / "cache" / "models--someone--clip-saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    sae = random_sae("gated")
    save_sae(sae, repo / "snapshots" / commit / "layer_22")
    _offline_hub(monkeypatch, tmp_path / "cache")
    assert load_sae("someone/clip-saes", subfolder="layer_22").cfg == sae.cfg
    assert load_sae("someone/clip-saes/layer_22").cfg == sae.cfg


def test_hub_id_that_cannot_be_fetched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _offline_hub(monkeypatch, tmp_path / "cache")
    with pytest.raises(CheckpointError, match="not a local path, and downloading 'someone/missing'"):
        load_sae("someone/missing")
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        load_sae(tmp_path / "nowhere")


def test_config_the_module_rejects_is_a_checkpoint_error(ckpt: Path) -> None:
    header = json.loads((ckpt / "cfg.json").read_text())
    header["config"] |= {"architecture": "topk", "k": 2, "rescale_acts_by_decoder_norm": True}
    (ckpt / "cfg.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="rescale_acts_by_decoder_norm"):
        load_sae(ckpt)


def test_failed_write_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    """A write that fails part-way (here: the disk refuses a file, as a full disk would) leaves the old
    checkpoint readable and no staging folder behind."""
    old = random_sae("relu", seed=1)
    save_sae(old, tmp_path / "ckpt")

    def fill(staging: Path) -> None:
        save_file({"W_enc": torch.zeros(2)}, staging / "sae.safetensors")
        (staging / "missing-folder" / "cfg.json").write_text("{}")

    with pytest.raises(FileNotFoundError):
        write_checkpoint_dir(tmp_path / "ckpt", fill)
    assert load_sae(tmp_path / "ckpt").cfg == old.cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
