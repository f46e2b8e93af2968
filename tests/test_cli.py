"""The installed `vlm-steer` console script runs the README's own steering example and gets its answers."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "vlm-steer"


def readme_steer_example() -> tuple[list[str], str, str]:
    """The quick start's `vlm-steer steer` command and the steered / unsteered answers its table shows."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```console\n\$ (?P<cmd>\S*vlm-steer steer [^\n]+)\n(?P<out>.*?)```", readme, re.DOTALL)
    assert block, "README.md has no ```console block running `vlm-steer steer`"
    row = answer_row(block["out"])
    assert row, "the README example shows no steered / unsteered table"
    return shlex.split(block["cmd"])[1:], *row


def answer_row(table: str) -> tuple[str, str] | None:
    """The first body row under the `steered | unsteered` header of a rich table."""
    found = re.search(r"┃ steered\s*┃ unsteered\s*┃.*?\n.*?\n│ (.+?)\s*│ (.+?)\s*│", table)
    return (found[1].strip(), found[2].strip()) if found else None


@pytest.mark.skipif(not SCRIPT.exists(), reason="the vlm-steer console script is not installed in this venv")
def test_readme_steering_example_answers_as_shown() -> None:
    args, steered, default = readme_steer_example()
    out = subprocess.run([str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert answer_row(out.stdout) == (steered, default), out.stdout
    assert steered != default
