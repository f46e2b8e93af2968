"""Atomic writes of files and folders: a reader, or a job killed mid-write, sees the old content or
the new, never half of it. The one place the project writes anything that others read back.

Files go to a temp file beside the target, are fsynced, then renamed over it (`os.replace` is atomic
on POSIX). Folders are filled in a staging sibling and swapped in by rename; `replace_folder` moves
the old folder aside first and puts it back if the new one cannot be moved in, so a failed swap
leaves the old folder exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import Tensor

_CHUNK = 1 << 22


def _process_umask() -> int:
    """The umask, read once at import (reading it means setting it, which is not thread-safe later)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _file_mode(file: Path) -> int:
    """The mode the written file gets: the old file's, or what `open()` would give a new one (mkstemp's
    temp files are 0600, which would hide a new checkpoint from everyone but its writer)."""
    try:
        return file.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` so a rename never publishes unwritten blocks."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_path(Path(root))


def atomic_write_bytes(file: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to a temp file beside `file`, fsync it, then rename it over `file`."""
    file = Path(file)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode(file))
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(file: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(file, text.encode("utf-8"))


def atomic_write_json(file: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """JSON with a trailing newline, so the file diffs and cats cleanly."""
    atomic_write_text(file, json.dumps(obj, indent=indent) + "\n")


def atomic_save_safetensors(
    file: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors' `save_file`, but atomic: the tensors are serialised in memory, then written whole."""
    atomic_write_bytes(file, safetensors_bytes(dict(tensors), metadata=metadata))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The digest checkpoints and manifests record, so a reader can tell a damaged or swapped file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def replace_folder(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> None:
    """Make the complete folder `tmp_dir` become `final_dir`, replacing any folder there.

    The old folder is renamed aside, the new one renamed in, and only then is the old one deleted.
    If moving the new one in fails, the old folder is renamed back and the error re-raised: the
    caller still has `tmp_dir`, and `final_dir` is exactly what it was. `tmp_dir` must be on the
    same filesystem as `final_dir` (a sibling is), or the rename fails with EXDEV.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    _fsync_tree(tmp_dir)
    retired = final_dir.parent / f".{final_dir.name}.old-{uuid.uuid4().hex[:12]}"
    had_old = final_dir.exists()
    if had_old:
        os.rename(final_dir, retired)
    try:
        os.rename(tmp_dir, final_dir)
    except BaseException:
        if had_old:
            os.rename(retired, final_dir)
        raise
    _fsync_path(final_dir.parent)
    if had_old:
        shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def staged_folder(final_dir: str | os.PathLike[str], *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging sibling of `final_dir`; when the block ends without error it becomes
    `final_dir`. On error, or if `replace=False` and `final_dir` already exists (another writer got
    there first: their folder is kept), the staging folder is deleted.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = final_dir.parent / f".{final_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        if replace:
            replace_folder(staging, final_dir)
        elif not final_dir.exists():
            _fsync_tree(staging)
            try:
                os.rename(staging, final_dir)
            except OSError:
                if not final_dir.exists():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_folder(final_dir: str | os.PathLike[str], fill: Callable[[Path], None]) -> None:
    """Call `fill(staging)` to write the folder's contents, then swap it in with `replace_folder`."""
    with staged_folder(final_dir) as staging:
        fill(staging)
