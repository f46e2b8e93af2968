"""sae_modules.atomic_file: files and folders are replaced whole, and a failed folder swap (a real OS
error, not a patched function) keeps the old folder."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_modules.atomic_file import (
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    replace_folder,
    sha256_file,
    staged_folder,
    write_folder,
)

OTHER_FILESYSTEM = Path("/dev/shm")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _make_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def test_file_writers_replace_the_whole_file_and_leave_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old contents that are longer than the new ones")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_json(tmp_path / "j.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert (tmp_path / "j.json").read_text().endswith("\n")
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    atomic_save_safetensors(tmp_path / "w.safetensors", tensors, metadata={"k": "v"})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], tensors["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.json", "out.bin", "t.txt", "w.safetensors"]


def test_written_files_get_the_mode_open_would_give_or_keep_the_old_one(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("made by open()")
    atomic_write_text(tmp_path / "new.txt", "made atomically")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    (tmp_path / "new.txt").chmod(0o640)
    atomic_write_text(tmp_path / "new.txt", "again")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640


def test_failed_file_replace_keeps_the_target_and_removes_the_temp_file(tmp_path: Path) -> None:
    """os.replace onto a non-empty folder fails (EISDIR/ENOTEMPTY): the folder and its file survive."""
    target = _make_folder(tmp_path / "target", {"keep.txt": b"keep"})
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert _tree(target) == {"keep.txt": b"keep"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom((1 << 22) + 17)  # more than one read chunk
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_replace_folder_swaps_in_the_new_folder(tmp_path: Path) -> None:
    final = _make_folder(tmp_path / "final", {"a.txt": b"old", "sub/b.txt": b"old b"})
    new = _make_folder(tmp_path / ".final.tmp", {"a.txt": b"new", "c.txt": b"c"})
    replace_folder(new, final)
    assert _tree(final) == {"a.txt": b"new", "c.txt": b"c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_replace_folder_into_a_new_place(tmp_path: Path) -> None:
    new = _make_folder(tmp_path / ".x.tmp", {"a.txt": b"a"})
    replace_folder(new, tmp_path / "x")
    assert _tree(tmp_path / "x") == {"a.txt": b"a"}
    assert not new.exists()


def test_failed_swap_keeps_the_old_folder(tmp_path: Path) -> None:
    """The new folder sits on another filesystem, so the kernel refuses to rename it in (EXDEV) after
    the old folder was moved aside: the old folder must be back, whole, and nothing left beside it."""
    if not OTHER_FILESYSTEM.is_dir() or OTHER_FILESYSTEM.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(f"needs {OTHER_FILESYSTEM} on a filesystem other than {tmp_path}'s")
    old_files = {"a.txt": b"old", "sub/b.txt": b"old b"}
    final = _make_folder(tmp_path / "final", old_files)
    with tempfile.TemporaryDirectory(dir=OTHER_FILESYSTEM) as other:
        new = _make_folder(Path(other) / "new", {"a.txt": b"new"})
        with pytest.raises(OSError) as raised:
            replace_folder(new, final)
        assert raised.value.errno == errno.EXDEV
        assert _tree(new) == {"a.txt": b"new"}, "the caller keeps its new folder"
    assert _tree(final) == old_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_staged_folder_that_fails_keeps_the_old_folder(tmp_path: Path) -> None:
    final = _make_folder(tmp_path / "final", {"a.txt": b"old"})
    with pytest.raises(FileNotFoundError), staged_folder(final) as staging:
        (staging / "a.txt").write_bytes(b"new")
        (staging / "no-such-folder" / "b.txt").write_bytes(b"b")  # a real write error part-way
    assert _tree(final) == {"a.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_write_folder_replaces_and_creates_parents(tmp_path: Path) -> None:
    write_folder(tmp_path / "deep" / "x", lambda d: (d / "f").write_bytes(b"1"))
    write_folder(tmp_path / "deep" / "x", lambda d: (d / "g").write_bytes(b"2"))
    assert _tree(tmp_path / "deep" / "x") == {"g": b"2"}
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["x"]


def test_staged_folder_without_replace_keeps_the_first_writers_folder(tmp_path: Path) -> None:
    """Two processes building the same cache: the one that finishes second keeps the first one's folder."""
    with staged_folder(tmp_path / "cache", replace=False) as staging:
        (staging / "f").write_bytes(b"first")
    with staged_folder(tmp_path / "cache", replace=False) as staging:
        (staging / "f").write_bytes(b"second")
    assert _tree(tmp_path / "cache") == {"f": b"first"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
