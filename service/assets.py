"""Which model and SAE checkpoints the service loads: the registry's, or the demo pair.

With no model configured the service serves the shipped demo LLaVA and SAE
(`sae_modules.shapes.DEMO_MODEL_DIR` / `DEMO_SAE_DIR`), checked at every start. Where they are not
shipped yet, it builds a tiny *random* LLaVA and SAE once into a cache directory and says so loudly:
the API then works end to end but the answers mean nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sae_modules.atomic_file import staged_folder
from service.config import ServiceSettings

log = logging.getLogger(__name__)

RANDOM_DEMO_WORDS = ("a", "the", "red", "green", "blue", "circle", "square", "triangle", "what", "is", "this",
                     "shape", "color", "describe", "image", "?", ".", "it", "big", "small")


@dataclass
class Checkpoints:
    model: str
    saes: dict[str, str]
    default_sae: str | None
    layers: dict[str, int] = field(default_factory=dict)
    random: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_STEER_CACHE", Path.home() / ".cache" / "vlm-steer"))


def _shipped_demo() -> tuple[Path, Path] | None:
    try:
        from sae_modules.shapes import DEMO_MODEL_DIR, DEMO_SAE_DIR
    except ImportError:
        return None
    model_dir, sae_dir = Path(DEMO_MODEL_DIR), Path(DEMO_SAE_DIR)
    if (model_dir / "config.json").is_file() and sae_dir.is_dir() and any(sae_dir.iterdir()):
        return model_dir, sae_dir
    return None


def build_random_demo(target: Path) -> tuple[Path, Path]:
    """A tiny random LLaVA (16x16 images, 4 patches) and a random BatchTopK SAE at its layer -2."""
    from sae_modules.formats.native import save_sae
    from sae_modules.saes import SAEConfig, build_sae
    from sae_modules.saes.base import SourceInfo
    from sae_modules.shapes.builder import build_llava, build_processor, build_tokenizer

    model_dir, sae_dir = target / "model", target / "sae"
    if (model_dir / "config.json").is_file() and (sae_dir / "cfg.json").is_file():
        return model_dir, sae_dir
    with staged_folder(target, replace=False) as staging:  # another process may build it too: first one wins
        processor = build_processor(build_tokenizer(RANDOM_DEMO_WORDS), image_size=16, patch_size=8)
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
        text = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2}
        model = build_llava(processor, vision=vision, text=text, seed=0)
        model.save_pretrained(staging / "model")
        processor.save_pretrained(staging / "model")
        sae = build_sae(SAEConfig(architecture="batchtopk", d_in=32, n_latents=128, k=4, threshold=0.1,
                                  source=SourceInfo(layer=-2, tokens="all")))
        save_sae(sae, staging / "sae")
    return model_dir, sae_dir


def check_layers(saes: dict[str, str], layers: dict[str, int]) -> None:
    """Every registry SAE must know its tower block: from its checkpoint or the registry's `layer`.

    `vlm-steer serve` checks it before any replica starts, so a checkpoint that records none (the paper's
    releases: their config.json leaves `layer` empty) fails with one line saying what to set, not a
    replica that never becomes healthy; replicas do not repeat it (it loads every SAE once more).
    Raises CheckpointError (a ValueError).
    """
    from sae_modules.formats import CheckpointError, load_sae

    for sae_id, path in saes.items():
        if sae_id in layers:
            continue
        recorded = load_sae(path).cfg.source.layer
        if recorded is None:
            raise CheckpointError(
                f"config: SAE {sae_id!r} ({path}) does not record the tower block it reads; set it in the "
                f"registry as saes.{sae_id}.layer (the paper's steering SAE reads block 22)"
            )
        if not isinstance(recorded, int):
            raise CheckpointError(
                f"config: SAE {sae_id!r} ({path}) was trained on the image embedding ({recorded!r}), which LLaVA "
                "never reads; serve an SAE trained on a tower block"
            )


def resolve_checkpoints(settings: ServiceSettings) -> Checkpoints:
    saes = {sae_id: entry.path for sae_id, entry in settings.saes.items()}
    layers = {sae_id: entry.layer for sae_id, entry in settings.saes.items() if entry.layer is not None}
    if settings.model.path is not None:
        if not saes:
            raise ValueError("config: a model path is set but the SAE registry (saes) is empty")
        return Checkpoints(settings.model.path, saes, settings.default_sae, layers)
    shipped = _shipped_demo()
    if shipped is not None:
        model_dir, sae_dir = shipped
        log.info("serving the shipped demo model %s with SAE %s", model_dir, sae_dir)
        return Checkpoints(str(model_dir), saes or {"demo": str(sae_dir)}, settings.default_sae, layers)
    model_dir, sae_dir = build_random_demo(cache_dir() / "random-demo")
    log.warning("NO DEMO MODEL SHIPPED YET: serving a tiny RANDOM LLaVA and SAE from %s; answers are meaningless",
                model_dir.parent)
    return Checkpoints(str(model_dir), saes or {"demo": str(sae_dir)}, settings.default_sae, layers, random=True)
