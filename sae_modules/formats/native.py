"""Our checkpoint format: a directory with `cfg.json` and `sae.safetensors`.

cfg.json holds the format version, the sha256 of the weights file and the full SAEConfig (under
"config"), so a checkpoint is self-describing and a damaged or swapped weights file is caught
before any tensor is used. Writes are atomic (see `writing.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from sae_modules.atomic_file import sha256_file
from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.reading import build_and_load, parse_config, read_json, read_safetensors
from sae_modules.formats.writing import write_checkpoint_dir
from sae_modules.saes.base import SAE

FORMAT_NAME = "vlm-steer-sae"
FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


def save_sae(sae: SAE, path: str | Path) -> Path:
    """Write `sae` to the directory `path` atomically; an existing checkpoint there is replaced."""
    path = Path(path)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sae.state_dict().items()}
    cfg = sae.cfg

    def fill(staging: Path) -> None:
        save_file(tensors, staging / WEIGHTS_FILE)
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
            "config": cfg.model_dump(mode="json"),
        }
        (staging / CFG_FILE).write_text(json.dumps(header, indent=2) + "\n")

    write_checkpoint_dir(path, fill)
    return path


def load_native(directory: Path) -> SAE:
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    header = read_json(cfg_path)
    version = header.get("format_version")
    if header.get("format") != FORMAT_NAME or not isinstance(version, int):
        raise CheckpointError(f"{cfg_path} is not a {FORMAT_NAME} config (no 'format'/'format_version')")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version {version}; this vlm-steer reads up to {FORMAT_VERSION}: "
            "upgrade vlm-steer"
        )
    tensors = read_safetensors(weights_path)
    actual = sha256_file(weights_path)
    if actual != header.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_path} does not match the sha256 recorded in {cfg_path} "
            f"(recorded {header.get('weights_sha256')}, file has {actual}): "
            "the file is corrupt or was replaced"
        )
    cfg = parse_config(header.get("config"), str(cfg_path))
    return build_and_load(cfg, tensors, str(weights_path))
