"""The taxa world and the small tower trained on it: finding 2 (Matryoshka levels coarse to fine) in miniature.

`TAXA_TOWER_DIR` lives inside the package, as the demo assets do, so `vlm-steer evaluate paper`
runs offline from an installed wheel; `python -m sae_modules.taxa.build` (`make taxa-tower`)
re-creates it and its manifest.
"""

from __future__ import annotations

from pathlib import Path

TAXA_ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TAXA_TOWER_DIR = TAXA_ASSETS_DIR / "tower"
TAXA_MANIFEST = TAXA_ASSETS_DIR / "MANIFEST.json"

__all__ = ["TAXA_ASSETS_DIR", "TAXA_MANIFEST", "TAXA_TOWER_DIR"]
