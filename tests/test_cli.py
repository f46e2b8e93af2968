"""The installed `vlm-steer` console script starts and offers every sub-command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "vlm-steer"


@pytest.mark.skipif(not SCRIPT.exists() and shutil.which("vlm-steer") is None, reason="package not installed")
def test_console_script_lists_every_command() -> None:
    script = str(SCRIPT) if SCRIPT.exists() else "vlm-steer"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for command in ("extract", "train", "export", "steer", "serve", "evaluate"):
        assert command in out.stdout
