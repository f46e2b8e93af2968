"""Writing a checkpoint folder: atomically (`sae_modules.atomic_file`), and never over a folder that
holds anything but checkpoint files, so a mistyped destination cannot wipe someone's data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sae_modules.atomic_file import write_folder
from sae_modules.formats.errors import CheckpointError

#: Files a checkpoint folder of any layout we write holds; only such a folder is overwritten.
CHECKPOINT_FILES = frozenset(
    {"cfg.json", "sae.safetensors", "sae_weights.safetensors", "sparsity.safetensors", "ae.pt", "config.json"}
)
#: The latent dictionary written beside a checkpoint (sae_modules.evaluation.latent_stats); replaced with it.
DICTIONARY_FILES = frozenset({"latent_stats.json", "latent_stats.safetensors", "latent_labels.json"})


def _check_replaceable(target: Path) -> None:
    if not target.is_dir():
        raise CheckpointError(f"refusing to overwrite {target}: it exists and is not a checkpoint directory")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in CHECKPOINT_FILES | DICTIONARY_FILES)
    if foreign:
        raise CheckpointError(
            f"refusing to overwrite {target}: it holds files that are not part of a checkpoint "
            f"({', '.join(foreign)})"
        )


def write_checkpoint_dir(target: str | Path, fill: Callable[[Path], None]) -> None:
    """Call `fill(staging)` to write the files, then swap the folder in; an old checkpoint there is
    replaced only once the new one is complete, and kept if the swap fails."""
    target = Path(target)
    if target.exists():
        _check_replaceable(target)
    write_folder(target, fill)
