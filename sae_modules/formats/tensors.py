"""Reading weight files and checking their tensors, with messages that name the file and tensor."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from sae_modules.formats.errors import CheckpointError
from sae_modules.saes.base import SAE


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {exc}") from exc


def read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a foreign `.pt` state dict without executing pickled code (weights_only=True)."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on damage
        raise CheckpointError(f"{path} could not be loaded as a plain tensor state dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def check_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], where: str, why: str) -> None:
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


def load_into(sae: SAE, tensors: Mapping[str, Tensor], where: str) -> SAE:
    """Copy checked tensors into a freshly built module; names must match its state dict exactly."""
    own = sae.state_dict()
    unexpected = sorted(set(tensors) - set(own))
    if unexpected:
        raise CheckpointError(f"{where} has unexpected tensor(s) {', '.join(repr(u) for u in unexpected)}")
    expected = {name: tuple(t.shape) for name, t in own.items()}
    why = f"architecture {sae.cfg.architecture!r} with d_in={sae.cfg.d_in}, n_latents={sae.cfg.n_latents}"
    check_tensors(tensors, expected, where, why)
    sae.load_state_dict({name: t.to(own[name].dtype) for name, t in tensors.items()})
    return sae.eval()
