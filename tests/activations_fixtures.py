"""Tiny towers saved to disk the way real checkpoints are, and small generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
N_TOKENS = (32 // 8) ** 2 + 1
OPEN_CLIP_NAME = "vlmsteer-tiny-vit"
OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def write_images(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """`n` random-noise PNGs of varied sizes (so resizing and cropping really run)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = rng.integers(30, 50, size=2)
        path = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def clip_vision(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()


def clip_model(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPModel(CLIPConfig(vision_config=VISION, text_config=text, projection_dim=16)).eval()


def llava(seed: int = 0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=VISION, text_config=text, image_token_index=63)
    ).eval()


def save_llava(model, path: Path) -> Path:
    """Sharded like real LLaVA checkpoints (index + several files), with its image processor."""
    from transformers import CLIPImageProcessor

    model.save_pretrained(path, max_shard_size="40KB")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def open_clip_tower(folder: Path, seed: int = 0):
    """A registered tiny open_clip ViT and its weights saved with torch.save(state_dict)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(OPEN_CLIP_NAME).eval()
    weights = folder / "weights.pt"
    torch.save(model.state_dict(), weights)
    return model, weights
