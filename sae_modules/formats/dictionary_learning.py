"""dictionary_learning checkpoints, the layout of the paper's released SAEs: BatchTopK and Matryoshka
BatchTopK, including the paper repository's vendored copy that spells the class "Matroyshka".

`trainSAE(save_dir=...)` writes `trainer_<i>/config.json` (`{"trainer": ..., "buffer": ...}`),
the final state dict as `trainer_<i>/ae.pt` and, at `save_steps`, `trainer_<i>/checkpoints/ae_<step>.pt`.
Any `ae*.pt` file loads; its config.json is read beside it or one level up (for `checkpoints/`).

Both keep k and the learned threshold θ as buffers in the state dict and rescale their biases and θ
at save time, so a checkpoint takes raw activations, as ours do. Their inference encode is
`relu(pre) * (relu(pre) > θ)`. `BatchTopKSAE` stores nn.Linear weights ([out, in]), so its encoder
and decoder are transposed relative to the Matryoshka class, which stores W_enc [d_in, n] directly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from torch import Tensor

from sae_modules.activations.blocks import LAST_LAYER, Layer
from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.reading import (
    build_and_load,
    check_tensors,
    parse_config,
    read_json,
    read_torch_state_dict,
)
from sae_modules.saes.base import SAE

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
_STEP_FILE = re.compile(r"^ae_(\d+)\.pt$")
BATCHTOPK_CLASSES = ("BatchTopKSAE",)
MATRYOSHKA_CLASSES = ("MatryoshkaBatchTopKSAE", "MatroyshkaBatchTopKSAE")


def weights_files(directory: Path) -> list[Path]:
    """The `ae*.pt` state dicts in `directory`, best first: the final `ae.pt`, then the latest step."""
    files = [p for p in directory.glob("ae*.pt") if p.is_file()]

    def rank(path: Path) -> tuple[int, int, str]:
        step = _STEP_FILE.match(path.name)
        return (path.name != WEIGHTS_FILE, -int(step.group(1)) if step else 0, path.name)

    return sorted(files, key=rank)


def find_weights(directory: Path) -> Path | None:
    """The state dict a trainer folder or its `checkpoints/` folder stands for, if it holds one."""
    for folder in (directory, directory / CHECKPOINTS_DIR):
        if folder.is_dir() and (files := weights_files(folder)):
            return files[0]
    return None


def _trainer_config(weights: Path) -> dict[str, Any]:
    """The `trainer` object of config.json beside the weights, or one level up (`checkpoints/ae_N.pt`)."""
    for path in (weights.parent / CONFIG_FILE, weights.parent.parent / CONFIG_FILE):
        if not path.is_file():
            continue
        config = read_json(path)
        if "trainer" not in config:
            if path.parent == weights.parent:
                raise CheckpointError(
                    f"{path} has no 'trainer' object: it is not a dictionary_learning config"
                )
            continue
        trainer = config["trainer"]
        if not isinstance(trainer, dict):
            raise CheckpointError(f"{path}: 'trainer' must be an object")
        return trainer
    return {}


def _dict_class(trainer: dict[str, Any], state: dict[str, Tensor], where: str) -> str:
    """The class named in config.json, or the one the state dict's keys identify when it is absent."""
    named = trainer.get("dict_class")
    if named is None:
        if "group_sizes" in state:
            return MATRYOSHKA_CLASSES[0]
        if "encoder.weight" in state:
            return BATCHTOPK_CLASSES[0]
        raise CheckpointError(f"{where}: no config.json and the tensors match no supported dictionary class")
    if named not in BATCHTOPK_CLASSES + MATRYOSHKA_CLASSES:
        raise CheckpointError(
            f"{where}: dictionary class {named!r} is not supported "
            f"(supported: {', '.join(BATCHTOPK_CLASSES + MATRYOSHKA_CLASSES)})"
        )
    return named


def _dims(
    trainer: dict[str, Any], state: dict[str, Tensor], encoder_key: str, d_in_axis: int
) -> tuple[int, int]:
    """(d_in, n_latents): from config.json when it has them, else from the encoder tensor."""
    encoder = state.get(encoder_key)
    shape = tuple(encoder.shape) if encoder is not None and encoder.ndim == 2 else (0, 0)
    d_in = trainer.get("activation_dim", shape[d_in_axis])
    n_latents = trainer.get("dict_size", shape[1 - d_in_axis])
    return int(d_in), int(n_latents)


def _layer(value: Any) -> Layer | None:
    """The trainer's `layer`, when it is a layer index or "last" (the paper's training script writes "")."""
    if (isinstance(value, int) and not isinstance(value, bool)) or value == LAST_LAYER:
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def load_dictionary_learning(weights_path: Path) -> SAE:
    """Read one `ae*.pt` state dict (never unpickling code) with the trainer config that goes with it."""
    where = str(weights_path)
    state = read_torch_state_dict(weights_path)
    trainer = _trainer_config(weights_path)
    dict_class = _dict_class(trainer, state, where)
    matryoshka = dict_class in MATRYOSHKA_CLASSES
    if matryoshka:
        d_in, n = _dims(trainer, state, "W_enc", 0)
        names = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec"}
        expected = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
        groups = state["group_sizes"].numel() if "group_sizes" in state else 0
        expected["group_sizes"] = (groups,)  # a 1-D list of sizes; their sum is checked with the config
    else:
        d_in, n = _dims(trainer, state, "encoder.weight", 1)
        names = {
            "W_enc": "encoder.weight",
            "b_enc": "encoder.bias",
            "W_dec": "decoder.weight",
            "b_dec": "b_dec",
        }
        expected = {
            "encoder.weight": (n, d_in),
            "encoder.bias": (n,),
            "decoder.weight": (d_in, n),
            "b_dec": (d_in,),
        }
    expected |= {"k": (), "threshold": ()}
    check_tensors(state, expected, where, f"{dict_class} with activation_dim={d_in}, dict_size={n}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where} has unexpected tensor(s) {', '.join(map(repr, unexpected))}")

    threshold = float(state["threshold"])
    if threshold < 0:
        raise CheckpointError(
            f"{where}: threshold is {threshold}, the value before any was learned (training stopped before "
            "threshold_start_step), so this SAE has no inference threshold"
        )
    source = {"model_id": trainer.get("lm_name") or None, "layer": _layer(trainer.get("layer"))}
    fields: dict[str, Any] = {
        "architecture": "matryoshka_batchtopk" if matryoshka else "batchtopk",
        "d_in": d_in,
        "n_latents": n,
        "k": int(state["k"]),
        "threshold": threshold,
        "source": source,
    }
    if matryoshka:
        fields["group_sizes"] = [int(size) for size in state["group_sizes"].tolist()]
    cfg = parse_config(fields, f"{where} ({dict_class})")
    tensors = {ours: state[theirs] for ours, theirs in names.items()}
    if not matryoshka:
        tensors["W_enc"], tensors["W_dec"] = tensors["W_enc"].T.contiguous(), tensors["W_dec"].T.contiguous()
    return build_and_load(cfg, tensors, where)
