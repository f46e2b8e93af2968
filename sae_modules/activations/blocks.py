"""Find a vision tower's transformer blocks, whatever library or version built it.

Module paths move between releases (transformers 5 dropped `vision_model` inside
`CLIPVisionModel`; LLaVA keeps its tower at `model.vision_tower`), so we look blocks up by
shape, not by a fixed path, and hook them instead of replacing modules.
"""

from __future__ import annotations

from torch import nn

_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "vision_model.", "visual.", "")
_BLOCK_SUFFIXES = ("encoder.layers", "transformer.resblocks")


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The ordered blocks of the vision tower inside `model` (a tower, a CLIP model, a LLaVA, open_clip)."""
    modules = dict(model.named_modules())
    for prefix in _VISION_PREFIXES:
        for suffix in _BLOCK_SUFFIXES:
            found = modules.get(prefix + suffix)
            if isinstance(found, nn.ModuleList):
                return found
    raise ValueError(f"no vision transformer blocks found in {type(model).__name__}")


def resolve_layer(layer: int, n_blocks: int) -> int:
    """A block index in [0, n_blocks): negative indices count from the end, like LLaVA's -2."""
    resolved = layer + n_blocks if layer < 0 else layer
    if not 0 <= resolved < n_blocks:
        raise ValueError(f"layer {layer} is out of range for a tower of {n_blocks} blocks")
    return resolved
