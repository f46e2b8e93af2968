"""`load_sae`: find a checkpoint (local path, sub-folder, or Hugging Face Hub id) and read it.

The layout decides the reader: `cfg.json` + `sae.safetensors` is ours, `cfg.json` +
`sae_weights.safetensors` is SAELens, `ae.pt` (+ `config.json`) is dictionary_learning, the
library the paper's released SAEs were trained with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download

from sae_modules.formats import dictionary_learning, native, saelens
from sae_modules.formats.errors import CheckpointError
from sae_modules.saes.base import SAE

Format = Literal["native", "saelens", "dictionary_learning"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")

_MARKERS: dict[Format, tuple[str, ...]] = {
    "native": (native.CFG_FILE, native.WEIGHTS_FILE),
    "saelens": (saelens.CFG_FILE, saelens.WEIGHTS_FILE),
    "dictionary_learning": (dictionary_learning.WEIGHTS_FILE,),
}
_READERS: dict[Format, Callable[[Path], SAE]] = {
    "native": native.load_native,
    "saelens": saelens.load_saelens,
    "dictionary_learning": dictionary_learning.load_dictionary_learning,
}


def detect_format(directory: Path) -> Format | None:
    for fmt, markers in _MARKERS.items():
        if all((directory / name).is_file() for name in markers):
            return fmt
    return None


def _download(repo_and_folder: str, subfolder: str | None) -> Path:
    """Fetch only the wanted sub-folder of a Hub repo; `owner/repo/sub/dir` names a sub-folder too."""
    parts = repo_and_folder.split("/")
    if not _HUB_ID.match(repo_and_folder):
        raise CheckpointError(f"{repo_and_folder} does not exist (and is not a Hub id like 'owner/repo')")
    repo_id = "/".join(parts[:2])
    folder = "/".join(p for p in ["/".join(parts[2:]), subfolder or ""] if p)
    try:
        root = snapshot_download(repo_id, allow_patterns=[f"{folder}/*"] if folder else None)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the caller
        raise CheckpointError(
            f"{repo_and_folder!r} is not a local path, and downloading {repo_id!r} from the Hugging Face Hub "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
    return Path(root) / folder if folder else Path(root)


def resolve_checkpoint(path: str | os.PathLike[str], subfolder: str | None = None) -> tuple[Path, Format]:
    """The directory holding one checkpoint, and its format."""
    local = Path(path)
    if local.exists():
        directory = local / subfolder if subfolder else local
    else:
        directory = _download(str(path), subfolder)
    if directory.is_file():
        directory = directory.parent
    if not directory.is_dir():
        raise CheckpointError(f"{directory} does not exist")
    fmt = detect_format(directory)
    if fmt is not None:
        return directory, fmt
    nested = sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_dir() and detect_format(p)
    )
    if nested:
        raise CheckpointError(
            f"{directory} holds {len(nested)} SAE checkpoint(s) in sub-folders; choose one with subfolder=: "
            + ", ".join(nested[:20])
        )
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(
        f"no SAE checkpoint in {directory}: expected cfg.json + sae.safetensors (vlm-steer), "
        f"cfg.json + sae_weights.safetensors (SAELens) or ae.pt (dictionary_learning); "
        f"found {found or 'nothing'}"
    )


def load_sae(
    path: str | os.PathLike[str], subfolder: str | None = None, device: str | torch.device = "cpu"
) -> SAE:
    """Load an SAE checkpoint of any supported layout; raises CheckpointError saying what is wrong."""
    directory, fmt = resolve_checkpoint(path, subfolder)
    return _READERS[fmt](directory).to(device)
