"""dictionary_learning checkpoints (the paper's released SAEs): BatchTopK (nn.Linear weights,
transposed) and Matryoshka BatchTopK (both spellings) load with the latents the installed library
computes; damaged files are refused clearly. tests/test_paper_checkpoint.py covers files written by
the library's own trainSAE and the commands that load them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from sae_modules import CheckpointError, load_sae
from sae_modules.formats import export_saelens

pytest.importorskip("dictionary_learning", reason="dictionary-learning is not installed (pip install -e '.[dev]')")
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE

D_IN, N, K, THETA = 6, 16, 3, 0.4
ATOL = 1e-5


def reference(state: dict[str, Tensor]):
    """dictionary_learning's own module holding `state` (the installed library, not a re-typed copy)."""
    if "group_sizes" in state:
        ae = MatryoshkaBatchTopKSAE(D_IN, N, K, group_sizes=state["group_sizes"].tolist())
    else:
        ae = BatchTopKSAE(D_IN, N, K)
    ae.load_state_dict(state)
    return ae.eval()


def batchtopk_state(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(THETA, dtype=torch.float32),
        "decoder.weight": torch.randn(D_IN, N, generator=g),
        "encoder.weight": torch.randn(N, D_IN, generator=g) * 0.5,
        "encoder.bias": torch.randn(N, generator=g) * 0.3,
        "b_dec": torch.randn(D_IN, generator=g),
    }


def matryoshka_state(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(THETA, dtype=torch.float32),
        "group_sizes": torch.tensor([2, 4, 10]),
        "W_enc": torch.randn(D_IN, N, generator=g) * 0.5,
        "b_enc": torch.randn(N, generator=g) * 0.3,
        "W_dec": torch.randn(N, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }


def trainer_config(dict_class: str, trainer_class: str, **extra: Any) -> dict[str, Any]:
    """config.json as dictionary_learning's trainSAE writes it."""
    trainer = {
        "trainer_class": trainer_class,
        "dict_class": dict_class,
        "activation_dim": D_IN,
        "dict_size": N,
        "k": K,
        "layer": 22,
        "lm_name": "openai/clip-vit-large-patch14-336",
        "threshold_beta": 0.999,
        "threshold_start_step": 1000,
        "submodule_name": None,
        **extra,
    }
    return {"trainer": trainer, "buffer": {"d_submodule": D_IN}}


def write_dl(path: Path, state: dict[str, Tensor], config: dict[str, Any] | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


CASES = {
    "BatchTopKSAE": (
        batchtopk_state,
        trainer_config("BatchTopKSAE", "BatchTopKTrainer"),
    ),
    "MatryoshkaBatchTopKSAE": (
        matryoshka_state,
        trainer_config("MatryoshkaBatchTopKSAE", "MatryoshkaBatchTopKTrainer", group_sizes=[2, 4, 10]),
    ),
    "MatroyshkaBatchTopKSAE": (
        matryoshka_state,
        trainer_config("MatroyshkaBatchTopKSAE", "MatroyshkaBatchTopKTrainer", group_sizes=[2, 4, 10]),
    ),
    "Matroyshka-paper-script-config": (  # sae-for-vlm's sae_train.py leaves these empty
        matryoshka_state,
        trainer_config(
            "MatroyshkaBatchTopKSAE", "MatroyshkaBatchTopKTrainer", layer="", lm_name="", submodule_name=""
        ),
    ),
    "BatchTopKSAE-without-config": (batchtopk_state, None),
    "Matryoshka-without-config": (matryoshka_state, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_gives_dictionary_learning_latents(tmp_path: Path, case: str) -> None:
    make_state, config = CASES[case]
    state = make_state()
    sae, theirs = load_sae(write_dl(tmp_path / "trainer_0", state, config)), reference(state)
    x = torch.randn(10, D_IN) * 2
    with torch.no_grad():
        expected = theirs.encode(x)
        assert 0 < (expected != 0).float().mean() < 1, "the test input must exercise both branches"
        torch.testing.assert_close(sae.encode(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(sae.decode(expected), theirs.decode(expected), atol=ATOL, rtol=0)
    assert (sae.cfg.k, sae.cfg.threshold) == (K, pytest.approx(THETA))
    if config is not None and config["trainer"]["lm_name"]:
        assert (sae.cfg.source.model_id, sae.cfg.source.layer) == ("openai/clip-vit-large-patch14-336", 22)
    else:
        assert (sae.cfg.source.model_id, sae.cfg.source.layer) == (None, None)


def test_batchtopk_linear_weights_are_transposed(tmp_path: Path) -> None:
    state = batchtopk_state()
    sae = load_sae(write_dl(tmp_path / "sae", state, CASES["BatchTopKSAE"][1]))
    assert sae.cfg.architecture == "batchtopk"
    assert torch.equal(sae.W_enc.data, state["encoder.weight"].T)
    assert torch.equal(sae.W_dec.data, state["decoder.weight"].T)


def test_matryoshka_keeps_its_groups(tmp_path: Path) -> None:
    sae = load_sae(write_dl(tmp_path / "sae", matryoshka_state(), CASES["MatroyshkaBatchTopKSAE"][1]))
    assert (sae.cfg.architecture, sae.cfg.group_sizes) == ("matryoshka_batchtopk", [2, 4, 10])


def test_release_with_several_saes_in_sub_folders(tmp_path: Path) -> None:
    for i, make in enumerate([batchtopk_state, matryoshka_state]):
        write_dl(tmp_path / "release" / f"trainer_{i}", make(), None)
    with pytest.raises(CheckpointError, match="trainer_0, trainer_1"):
        load_sae(tmp_path / "release")
    assert load_sae(tmp_path / "release", subfolder="trainer_1").cfg.architecture == "matryoshka_batchtopk"


def test_exported_to_saelens_gives_the_same_latents(tmp_path: Path) -> None:
    """The paper's SAE → SAELens jumprelu: SAELens' own encode of the export matches dictionary_learning's."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[dev]')")
    state = matryoshka_state()
    export_saelens(load_sae(write_dl(tmp_path / "paper", state, None)), tmp_path / "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"), device="cpu")
    x = torch.randn(8, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), reference(state).encode(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s, c: s.pop("encoder.bias"), r"missing tensor.*'encoder\.bias'"),
        (lambda s, c: c["trainer"].update(dict_size=N + 1), r"'encoder\.weight'.*\[16, 6\].*needs \[17, 6\]"),
        (lambda s, c: s["decoder.weight"].__setitem__((0, 0), float("nan")), "'decoder.weight'.*1 NaN"),
        (lambda s, c: s.update(threshold=torch.tensor(-1.0)), "no inference threshold"),
        (
            lambda s, c: c["trainer"].update(dict_class="AutoEncoderTopK"),
            "'AutoEncoderTopK' is not supported",
        ),
        (lambda s, c: s.update(extra=torch.zeros(1)), "unexpected tensor.*'extra'"),
    ],
)
def test_damaged_checkpoints(tmp_path: Path, damage: Any, message: str) -> None:
    state, config = batchtopk_state(), trainer_config("BatchTopKSAE", "BatchTopKTrainer")
    damage(state, config)
    with pytest.raises(CheckpointError, match=message):
        load_sae(write_dl(tmp_path / "sae", state, config))


def test_truncated_file(tmp_path: Path) -> None:
    path = write_dl(tmp_path / "sae", batchtopk_state(), None)
    data = (path / "ae.pt").read_bytes()
    (path / "ae.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not be loaded as a plain tensor state dict"):
        load_sae(path)


class Payload:
    """Stands in for arbitrary pickled code: weights_only=True must refuse to build it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never run",))


def test_pickled_code_is_not_executed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "sae"
    path.mkdir()
    torch.save({"W_enc": torch.zeros(2), "hook": Payload()}, path / "ae.pt")
    with pytest.raises(CheckpointError, match="could not be loaded as a plain tensor state dict"):
        load_sae(path)
    assert "this must never run" not in capsys.readouterr().out


def test_path_to_the_weights_file_itself(tmp_path: Path) -> None:
    path = write_dl(tmp_path / "sae", batchtopk_state(), None)
    assert load_sae(path / "ae.pt").cfg.architecture == "batchtopk"


def test_training_backup_is_refused_with_what_to_load_instead(tmp_path: Path) -> None:
    """trainSAE(backup_steps=...) overwrites ae.pt with {step, ae, optimizer, config, norm_factor} while it
    trains: weights in training units, not a checkpoint to serve."""
    ae = reference(batchtopk_state())
    optimizer = torch.optim.Adam(ae.parameters())
    ae(torch.randn(4, D_IN)).sum().backward()
    optimizer.step()
    backup = {"step": 7, "ae": ae.state_dict(), "optimizer": optimizer.state_dict(),
              "config": trainer_config("BatchTopKSAE", "BatchTopKTrainer")["trainer"], "norm_factor": 2.5}
    path = tmp_path / "trainer_0"
    path.mkdir()
    torch.save(backup, path / "ae.pt")
    with pytest.raises(CheckpointError, match=r"training backup \(step 7\).*checkpoints/ae_<step>\.pt"):
        load_sae(path)
