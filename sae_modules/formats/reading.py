"""Reading checkpoint files (JSON configs, safetensors, torch state dicts), checking their tensors and
building the module, with messages that name the file, the tensor or the field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from sae_modules.formats.errors import CheckpointError
from sae_modules.saes import build_sae
from sae_modules.saes.base import SAE, SAEConfig, SAEConfigError


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"config file {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def parse_config(data: Any, where: str) -> SAEConfig:
    """SAEConfig from a dict, turning pydantic's error into one line that names the field."""
    try:
        return SAEConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
        )
        raise CheckpointError(f"invalid SAE config in {where}: {problems}") from exc


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt): {exc}"
        ) from exc


def read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a foreign `.pt` state dict without executing pickled code (weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on damage
        raise CheckpointError(f"{path} could not be loaded as a plain tensor state dict: {exc}") from exc
    if isinstance(state, Mapping) and {"step", "ae", "optimizer"} <= set(state):
        raise CheckpointError(
            f"{path} is dictionary_learning's training backup (step {state['step']}), whose weights are in "
            "training units; load the final ae.pt or a checkpoints/ae_<step>.pt instead"
        )
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def check_tensors(
    tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], where: str, why: str
) -> None:
    """Every expected tensor is present, has the shape the config implies, and is finite.

    `why` describes the config the shapes come from, so a mismatch says which side to doubt.
    """
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"{where} is missing tensor(s) {', '.join(repr(m) for m in missing)}")
    for name, shape in expected.items():
        actual = tuple(tensors[name].shape)
        if actual != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {where} has shape {list(actual)}, but {why} needs {list(shape)}"
            )
        values = tensors[name]
        if values.is_floating_point():
            bad = int((~torch.isfinite(values)).sum())
            if bad:
                raise CheckpointError(f"tensor {name!r} in {where} has {bad} NaN or infinite value(s)")


def build_and_load(cfg: SAEConfig, tensors: Mapping[str, Tensor], where: str) -> SAE:
    """Build the module for `cfg` and copy in the checked tensors, whose names must match its state dict."""
    try:
        sae = build_sae(cfg)
    except SAEConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    own = sae.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise CheckpointError(f"{where} has unexpected tensor(s) {', '.join(repr(u) for u in unexpected)}")
    expected = {name: tuple(t.shape) for name, t in own.items()}
    why = f"architecture {sae.cfg.architecture!r} with d_in={sae.cfg.d_in}, n_latents={sae.cfg.n_latents}"
    check_tensors(tensors, expected, where, why)
    sae.load_state_dict({name: t.to(own[name].dtype) for name, t in tensors.items()})
    return sae.eval()
