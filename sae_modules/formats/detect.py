"""`load_sae`: find a checkpoint (local folder or file, sub-folder, or Hugging Face Hub id) and read it.

The content decides the reader, not the file names alone: `cfg.json` + `sae.safetensors` is ours
when cfg.json carries our format tag and EleutherAI sparsify's when it has a top-level `d_in`;
`cfg.json` + `sae_weights.safetensors` is SAELens; an `ae*.pt` state dict (in the folder or its
`checkpoints/`) is dictionary_learning, the library the paper's released SAEs were trained with.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import snapshot_download

from sae_modules.formats import dictionary_learning, native, saelens, sparsify
from sae_modules.formats.errors import CheckpointError
from sae_modules.formats.reading import read_json
from sae_modules.saes.base import SAE

Format = Literal["native", "sparsify", "saelens", "dictionary_learning"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")
_READERS: dict[Format, Callable[[Path], SAE]] = {
    "native": native.load_native,
    "sparsify": sparsify.load_sparsify,
    "saelens": saelens.load_saelens,
    "dictionary_learning": dictionary_learning.load_dictionary_learning,
}


def _cfg_json_format(directory: Path) -> Format:
    """Ours and sparsify's share file names; cfg.json's content says which one this is."""
    cfg_path = directory / native.CFG_FILE
    cfg = read_json(cfg_path)
    if "format" in cfg:
        return "native"
    if sparsify.is_sparsify_config(cfg):
        return "sparsify"
    raise CheckpointError(
        f"{cfg_path} is neither a vlm-steer config (no 'format') nor a sparsify one (no 'd_in' with "
        f"'k'/'activation'); its fields: {', '.join(sorted(cfg)) or 'none'}"
    )


def locate(path: Path) -> tuple[Path, Format] | None:
    """What `path` (a folder or a file in one) holds: the path its reader takes, and the format.

    Folder formats are read from their folder; dictionary_learning from the `ae*.pt` file itself.
    """
    if path.is_file():
        if path.suffix == ".pt" and path.name.startswith("ae"):
            return path, "dictionary_learning"
        path = path.parent
    if (path / saelens.CFG_FILE).is_file() and (path / saelens.WEIGHTS_FILE).is_file():
        return path, "saelens"
    if (path / native.CFG_FILE).is_file() and (path / native.WEIGHTS_FILE).is_file():
        return path, _cfg_json_format(path)
    weights = dictionary_learning.find_weights(path)
    if weights is not None:
        return weights, "dictionary_learning"
    return None


def detect_format(path: Path) -> Format | None:
    located = locate(path)
    return None if located is None else located[1]


def hub_allow_patterns(folder: str) -> list[str] | None:
    """What to fetch: a sub-folder, or one `.pt` file with the config.json beside it and one level up."""
    if not folder:
        return None
    if folder.endswith(".pt"):
        parents = [Path(folder).parent, Path(folder).parent.parent]
        return [folder] + [(parent / dictionary_learning.CONFIG_FILE).as_posix() for parent in parents]
    return [f"{folder}/*"]


def _download(repo_and_folder: str, subfolder: str | None) -> Path:
    """Fetch only the wanted part of a Hub repo; `owner/repo/sub/dir` names a sub-folder, and
    `owner/repo/trainer_0/checkpoints/ae_100000.pt` one dictionary_learning file."""
    parts = repo_and_folder.split("/")
    if not _HUB_ID.match(repo_and_folder):
        raise CheckpointError(f"{repo_and_folder} does not exist (and is not a Hub id like 'owner/repo')")
    repo_id = "/".join(parts[:2])
    folder = "/".join(p for p in ["/".join(parts[2:]), subfolder or ""] if p)
    try:
        root = snapshot_download(repo_id, allow_patterns=hub_allow_patterns(folder))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the caller
        raise CheckpointError(
            f"{repo_and_folder!r} is not a local path, and downloading {repo_id!r} from the Hugging Face Hub "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
    return Path(root) / folder if folder else Path(root)


def _nested_checkpoints(directory: Path) -> list[str]:
    """Sub-folders holding a checkpoint (not descending into one: a trainer's checkpoints/ is its own)."""
    found: list[str] = []
    for root, dirs, _ in os.walk(directory):
        for name in sorted(dirs):
            sub = Path(root) / name
            try:
                if locate(sub) is not None:
                    found.append(str(sub.relative_to(directory)))
            except CheckpointError:
                found.append(str(sub.relative_to(directory)))
        dirs[:] = [d for d in sorted(dirs) if str((Path(root) / d).relative_to(directory)) not in found]
    return found


def resolve_checkpoint(path: str | os.PathLike[str], subfolder: str | None = None) -> tuple[Path, Format]:
    """What one checkpoint's reader takes (its folder, or a dictionary_learning `.pt` file), and its format.

    `subfolder` picks one SAE of a release or training run that holds several: a trainer folder
    (`trainer_0`), a sparsify hookpoint (`layers.22`), or any relative path.
    """
    local = Path(path)
    if local.exists():
        target = local / subfolder if subfolder else local
    else:
        target = _download(str(path), subfolder)
    if not target.exists():
        raise CheckpointError(f"{target} does not exist")
    located = locate(target)
    if located is not None:
        return located
    directory = target if target.is_dir() else target.parent
    nested = _nested_checkpoints(directory)
    if nested:
        raise CheckpointError(
            f"{directory} holds {len(nested)} SAE checkpoints in sub-folders; choose one "
            "(the sub-folder's path, or subfolder=): " + ", ".join(nested[:20])
        )
    found = sorted(p.name for p in directory.iterdir())
    raise CheckpointError(
        f"no SAE checkpoint in {directory}: expected cfg.json + sae.safetensors (vlm-steer or sparsify), "
        f"cfg.json + sae_weights.safetensors (SAELens) or ae*.pt (dictionary_learning, also in "
        f"checkpoints/); found {found or 'nothing'}"
    )


def load_sae(
    path: str | os.PathLike[str], subfolder: str | None = None, device: str | torch.device = "cpu"
) -> SAE:
    """Load an SAE checkpoint of any supported layout; raises CheckpointError saying what is wrong."""
    where, fmt = resolve_checkpoint(path, subfolder)
    return _READERS[fmt](where).to(device)
