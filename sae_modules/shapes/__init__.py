"""The shapes world: a synthetic image domain and the small LLaVA + SAE trained on it, shipped as the default.

`DEMO_MODEL_DIR` and `DEMO_SAE_DIR` live inside the package so an installed wheel carries them;
the CLI and the service use them when no model or SAE is named. `DEMO_CLIP_DIR` is the small CLIP
(with its text tower) the LLaVA's tower started from: `clip:DEMO_CLIP_DIR` judges the steering score.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_CLIP_DIR = ASSETS_DIR / "clip"
DEMO_MODEL_DIR = ASSETS_DIR / "model"
DEMO_SAE_DIR = ASSETS_DIR / "sae"
DEMO_MANIFEST = ASSETS_DIR / "MANIFEST.json"

__all__ = ["ASSETS_DIR", "DEMO_CLIP_DIR", "DEMO_MANIFEST", "DEMO_MODEL_DIR", "DEMO_SAE_DIR"]
