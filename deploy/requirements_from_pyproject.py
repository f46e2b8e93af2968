"""Print the project's requirements (base plus the named extras) one a line, read from pyproject.toml.

Why: the image installs every dependency in a layer built from pyproject.toml alone, before the
source is copied, so a code change rebuilds only the last small layer and never reinstalls torch.
Extras that name the project itself (`vlm-steer[serve,ray]`) are expanded in place.

    python3 requirements_from_pyproject.py pyproject.toml serve ray > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_SELF_EXTRA = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)\[(?P<extras>[^\]]+)\]$")


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """Base dependencies plus each extra's, with the project's own extras expanded, order kept, no repeats."""
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    own_name = project["name"]
    out: list[str] = []

    def add(requirement: str) -> None:
        match = _SELF_EXTRA.match(requirement.replace(" ", ""))
        if match and match["name"] == own_name:
            for extra in match["extras"].split(","):
                add_extra(extra)
        elif requirement not in out:
            out.append(requirement)

    def add_extra(extra: str) -> None:
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r}; it has {sorted(optional)}")
        for requirement in optional[extra]:
            add(requirement)

    for requirement in project.get("dependencies", []):
        add(requirement)
    for extra in extras:
        add_extra(extra)
    return out


def main(argv: list[str]) -> None:
    path, *extras = argv
    with Path(path).open("rb") as handle:
        print("\n".join(requirements(tomllib.load(handle), extras)))


if __name__ == "__main__":
    main(sys.argv[1:])
