"""Find a vision tower's transformer blocks, whatever library or version built it.

Module paths move between releases (transformers 5 dropped `vision_model` inside
`CLIPVisionModel`; LLaVA keeps its tower at `model.vision_tower`), so we look blocks up by
shape, not by a fixed path, and hook them instead of replacing modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

LAST_LAYER = "last"
#: A block index (negative from the end) or "last", the tower's image embedding after every block.
Layer = int | Literal["last"]
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


def resolve_layer(layer: Layer, n_blocks: int) -> int:
    """A block index in [0, n_blocks): negative indices count from the end, like LLaVA's -2."""
    if layer == LAST_LAYER:
        raise ValueError(f"layer {layer!r} is not a block index: an SAE trained on the image embedding ('last'), "
                         "which comes after every block and which LLaVA never reads, has no block to attach to")
    resolved = layer + n_blocks if layer < 0 else layer
    if not 0 <= resolved < n_blocks:
        raise ValueError(f"layer {layer} is out of range for a tower of {n_blocks} blocks")
    return resolved


class _StopForward(Exception):
    """Raised from a hook once the wanted block has run, so later blocks are never computed."""


@dataclass
class BlockCapture:
    output: Tensor | None = None


@contextmanager
def capture_block_output(block: nn.Module, stop: bool = False) -> Iterator[BlockCapture]:
    """Record `block`'s output (its hidden states, not any attention weights) during the `with` body.

    With `stop`, the forward pass is cut right after the block: the model call inside the `with`
    returns nothing and the body's remaining statements are skipped, which saves the cost of the
    blocks above the one we read.
    """
    capture = BlockCapture()

    def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> None:
        capture.output = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        yield capture
    except _StopForward:
        pass
    finally:
        handle.remove()
