"""The weight-seeding Job's script (k8s/overlays/gpu/seed-weights.sh), run with bash on a temp "volume":
it copies a trained SAE once, downloads with the `hf` CLI only what is not there yet, and fails with a
clear message when no SAE can be had. A stand-in `hf` on PATH records its calls (no hub here)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.deploy_tools import ROOT

SCRIPT = ROOT / "k8s" / "overlays" / "gpu" / "seed-weights.sh"


@pytest.fixture
def volume(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hf").write_text('#!/usr/bin/env bash\necho "$@" >> "$HF_CALLS"\nmkdir -p "$4" && touch "$4/weights"\n')
    (bin_dir / "hf").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_CALLS": str(tmp_path / "calls"),
            "MODEL_REPO": "llava-hf/llava-1.5-7b-hf", "MODEL_DIR": str(tmp_path / "data/models/llava"),
            "SAE_REPO": "", "SAE_DIR": str(tmp_path / "data/saes/s"), "TRAINED_SAE": str(tmp_path / "data/runs/r/sae")}


def seed(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], check=False, env=env, capture_output=True, text=True)


def calls(env: dict[str, str]) -> list[str]:
    path = Path(env["HF_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def test_copies_the_trained_sae_once_and_downloads_the_model_once(volume: dict[str, str]) -> None:
    trained = Path(volume["TRAINED_SAE"])
    trained.mkdir(parents=True)
    (trained / "cfg.json").write_text("{}")
    first = seed(volume)
    assert first.returncode == 0, first.stderr
    assert calls(volume) == [f"download llava-hf/llava-1.5-7b-hf --local-dir {volume['MODEL_DIR']}"]
    assert (Path(volume["SAE_DIR"]) / "cfg.json").read_text() == "{}"
    second = seed(volume)
    assert second.returncode == 0 and "already seeded" in second.stdout
    assert len(calls(volume)) == 1, "a second run downloads nothing"


def test_downloads_a_released_sae_when_named(volume: dict[str, str]) -> None:
    result = seed({**volume, "SAE_REPO": "owner/paper-sae"})
    assert result.returncode == 0, result.stderr
    assert calls(volume)[-1] == f"download owner/paper-sae --local-dir {volume['SAE_DIR']}"


def test_fails_clearly_without_any_sae(volume: dict[str, str]) -> None:
    result = seed(volume)
    assert result.returncode == 1
    assert "set SAE_REPO" in result.stderr and volume["TRAINED_SAE"] in result.stderr
