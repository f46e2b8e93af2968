"""Write a checkpoint directory so that the target path only ever holds a complete checkpoint.

Both files are written into a fresh sibling directory, flushed to disk, and then swapped in by
rename. Replacing an existing checkpoint moves it aside first and deletes it only after the new
one is in place, so a crash leaves either the old checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from sae_modules.formats.errors import CheckpointError

_CHUNK = 1 << 22
#: Files a checkpoint directory of any supported layout holds; only such a directory is overwritten.
CHECKPOINT_FILES = frozenset(
    {"cfg.json", "sae.safetensors", "sae_weights.safetensors", "sparsity.safetensors", "ae.pt", "config.json"}
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_replaceable(target: Path) -> None:
    """Only a directory holding nothing but checkpoint files may be overwritten."""
    if not target.is_dir():
        raise CheckpointError(f"refusing to overwrite {target}: it exists and is not a checkpoint directory")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in CHECKPOINT_FILES)
    if foreign:
        raise CheckpointError(
            f"refusing to overwrite {target}: it holds files that are not part of a checkpoint "
            f"({', '.join(foreign)})"
        )


def write_checkpoint_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Call `fill(tmp_dir)` to write the files, then move them to `target` in one rename."""
    target = Path(target)
    if target.exists():
        _check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    staging = target.parent / f".{target.name}.tmp-{tag}"
    retired = target.parent / f".{target.name}.old-{tag}"
    staging.mkdir()
    try:
        fill(staging)
        for file in staging.iterdir():
            _fsync(file)
        if target.exists():
            os.rename(target, retired)
        os.rename(staging, target)
        _fsync(target.parent)
    except BaseException:
        if retired.exists() and not target.exists():
            os.rename(retired, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)
