"""Resumable training state on disk: tensors in safetensors, scalars in JSON, no pickle.

A run directory keeps `checkpoints/step-NNNNNNNN/` folders, each written under a temporary name
and renamed into place whole, and a `checkpoints/latest` pointer rewritten atomically *after*
the folder is complete — so a job killed at any instant leaves a pointer to a whole checkpoint.
Each folder holds `state.safetensors` (SAE parameters and buffers, Adam moments, dead-latent
counters, torch RNG), `state.json` (step, data position, input scale, SAE and training configs,
optimizer hyper-parameters) and `sae/`, the SAE as users load it (input scale folded in).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_modules.atomic_file import atomic_write_bytes, write_folder
from sae_modules.formats import CheckpointError
from sae_modules.saes.base import SAEConfig
from sae_modules.train.config import TrainConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
SAE_DIR = "sae"
STATE_FORMAT = "vlm-steer-train-state/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainingState:
    """Everything besides the model and optimizer that the next step depends on."""

    step: int
    input_scale: float
    samples_since_fired: Tensor
    epoch: int
    epoch_offset: int


@dataclass
class Checkpoint:
    """A loaded checkpoint, ready to be put back into a fresh SAE and optimizer."""

    path: Path
    config: TrainConfig
    sae_cfg: SAEConfig
    sae_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    state: TrainingState
    rng_state: Tensor
    data_fingerprint: str


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder the `latest` pointer names, or None when the run has no checkpoint yet."""
    pointer = checkpoint_root(run_dir) / LATEST
    if not pointer.exists():
        return None
    target = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (target / STATE_JSON).exists():
        raise CheckpointError(f"{pointer} names {target.name}, which is not a complete checkpoint")
    return target


def _optimizer_tensors(optimizer_state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in optimizer_state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["scalars"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    run_dir: Path,
    *,
    config: TrainConfig,
    sae_cfg: SAEConfig,
    sae_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    state: TrainingState,
    data_fingerprint: str,
    export_sae: Callable[[Path], None],
) -> Path:
    """Write one checkpoint folder, point `latest` at it, and prune older ones."""
    root = checkpoint_root(run_dir)
    name = f"step-{state.step:08d}"
    opt_tensors, opt_meta = _optimizer_tensors(optimizer_state)
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae_state.items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
    tensors["dead.samples_since_fired"] = state.samples_since_fired.cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": STATE_FORMAT,
        "step": state.step,
        "epoch": state.epoch,
        "epoch_offset": state.epoch_offset,
        "input_scale": state.input_scale,
        "data_fingerprint": data_fingerprint,
        "sae_cfg": sae_cfg.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "optimizer": opt_meta,
    }

    def fill(staging: Path) -> None:
        save_file(tensors, staging / STATE_TENSORS)
        (staging / STATE_JSON).write_text(json.dumps(meta, indent=1))
        export_sae(staging / SAE_DIR)

    shutil.rmtree(root / name, ignore_errors=True)  # a newer-than-latest leftover of a killed run
    write_folder(root / name, fill)
    atomic_write_bytes(root / LATEST, name.encode())
    _prune(root, keep=config.keep_checkpoints, newest=state.step)
    return root / name


def _prune(root: Path, keep: int, newest: int) -> None:
    """Drop all but the `keep` newest checkpoints up to `newest`, and folders a killed write left."""
    steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)))
    kept = [s for s in steps if s <= newest][-keep:]
    for step in set(steps) - set(kept):
        shutil.rmtree(root / f"step-{step:08d}", ignore_errors=True)
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`."""
    try:
        meta = json.loads((path / STATE_JSON).read_text())
        tensors = load_file(path / STATE_TENSORS)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read training checkpoint {path}: {err}") from None
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a {STATE_FORMAT} checkpoint")
    return Checkpoint(
        path=path,
        config=TrainConfig.model_validate(meta["config"]),
        sae_cfg=SAEConfig.model_validate(meta["sae_cfg"]),
        sae_state={k.removeprefix("sae."): v for k, v in tensors.items() if k.startswith("sae.")},
        optimizer_state=_optimizer_state(tensors, meta["optimizer"]),
        state=TrainingState(
            step=meta["step"],
            input_scale=meta["input_scale"],
            samples_since_fired=tensors["dead.samples_since_fired"],
            epoch=meta["epoch"],
            epoch_offset=meta["epoch_offset"],
        ),
        rng_state=tensors["rng.torch"],
        data_fingerprint=meta["data_fingerprint"],
    )
