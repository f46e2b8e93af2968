"""MANIFEST.json for the shipped demo artifacts: what each file is (sha256), how it was made, how good it is."""

from __future__ import annotations

import json
from pathlib import Path

from sae_modules.atomic_file import atomic_write_json, sha256_file
from sae_modules.errors import VlmSteerError

MANIFEST_NAME = "MANIFEST.json"


class ManifestError(VlmSteerError):
    """The shipped artifacts do not match their manifest (names the file)."""


def file_hashes(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under `root` except the manifest, keyed by relative path."""
    return {
        path.relative_to(root).as_posix(): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(root: Path, record: dict) -> Path:
    """Write `record` plus the file hashes to `root/MANIFEST.json` atomically."""
    files = file_hashes(root)
    body = {**record, "files": files, "total_bytes": sum(f["bytes"] for f in files.values())}
    target = root / MANIFEST_NAME
    atomic_write_json(target, body)
    return target


def verify_manifest(root: Path) -> dict:
    """The manifest, after checking every listed file exists with its recorded sha256 and nothing is extra."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing; run `make demo-model`")
    manifest = json.loads(path.read_text())
    actual = file_hashes(root)
    for name, entry in manifest["files"].items():
        if name not in actual:
            raise ManifestError(f"{name}: listed in {path} but missing")
        if actual[name]["sha256"] != entry["sha256"]:
            raise ManifestError(f"{name}: sha256 differs from {path}")
    extra = sorted(set(actual) - set(manifest["files"]))
    if extra:
        raise ManifestError(f"{extra[0]}: present but not listed in {path}")
    return manifest
