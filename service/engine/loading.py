"""Load a LLaVA checkpoint and attach SAEs to it, refusing any SAE that does not fit the tower.

An SAE fits when its d_in is the tower's width, its layer is a block whose output reaches the
projector (at or below `vision_feature_layer`), and the model it was trained on is this model's
vision tower (checked by name where the SAE records a hub id; a local directory recorded at training
time names a path on another machine, so only the width and the block are checked then).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sae_modules.activations.blocks import resolve_layer, vision_blocks
from sae_modules.errors import ErrorKind, VlmSteerError
from sae_modules.saes.base import SAE

#: Vision towers of LLaVA checkpoints, so an SAE trained on the bare CLIP model attaches to them.
#: A tower with CLIP ViT-L/14-336's shape is taken to be that model whatever its checkpoint is called.
_CLIP_L14_336 = "openai/clip-vit-large-patch14-336"
_CLIP_L14_336_SHAPE = (1024, 24, 336, 14)


class EngineLoadError(VlmSteerError):
    """A model or SAE that cannot be loaded; the message says which and why."""

    kind = ErrorKind.UNAVAILABLE


class SAEMismatchError(VlmSteerError):
    """An SAE that does not fit the model it is attached to; `field` is d_in, layer or model."""


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """fp32 on CPU, fp16 on GPU unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.float16
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise EngineLoadError(f"unknown dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]


def load_llava(model: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               vision_only: bool = False) -> tuple[nn.Module, object]:
    """A LlavaForConditionalGeneration and its processor from a hub id or a local directory, in eval mode.

    `vision_only` drops the language model after loading (the vLLM backend brings its own), keeping
    the tower and projector that the steerer runs.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch_dtype = resolve_dtype(dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(model)
        llava = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise EngineLoadError(f"cannot load LLaVA model {model!r}: {err}") from err
    if vision_only:
        llava.model.language_model = None
        llava.lm_head = None
    return llava.to(device).eval(), processor


def tower_names(model_name: str, model: nn.Module) -> set[str]:
    """The names an SAE's `source.model_id` may carry to attach to this model's tower."""
    names = {model_name, getattr(model.config, "_name_or_path", "") or model_name}
    vision = model.config.vision_config
    names |= {getattr(vision, "_name_or_path", "") or model_name}
    shape = (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size)
    if shape == _CLIP_L14_336_SHAPE:
        names.add(_CLIP_L14_336)
    return names | {Path(name).name for name in names}


def is_local_path(name: str) -> bool:
    """A directory name recorded on the machine that trained the SAE: it says nothing about the model here."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).exists()


def feature_block(model: nn.Module) -> int:
    """The deepest block whose output LLaVA's projector reads (`vision_feature_layer` is a hidden-state index)."""
    n_blocks = len(vision_blocks(model))
    layers = model.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    return max(layer + n_blocks + 1 if layer < 0 else layer for layer in layers) - 1


def check_sae_fits(model: nn.Module, model_name: str, sae: SAE, sae_id: str) -> None:
    """Raise SAEMismatchError unless `sae` can be attached to `model`'s vision tower."""
    width = model.config.vision_config.hidden_size
    if sae.d_in != width:
        raise SAEMismatchError(f"SAE {sae_id!r} has d_in={sae.d_in} but the vision tower's width is {width}", "d_in")
    layer = sae.cfg.source.layer
    if layer is None:
        raise SAEMismatchError(f"SAE {sae_id!r} does not record its layer: give it (the paper's steering SAE "
                               "reads block 22, `--layer 22` / `sae_layers`)", "layer")
    n_blocks = len(vision_blocks(model))
    try:
        block = resolve_layer(layer, n_blocks)
    except ValueError as err:
        raise SAEMismatchError(f"SAE {sae_id!r}: {err}", "layer") from err
    deepest = feature_block(model)
    if block > deepest:
        raise SAEMismatchError(
            f"SAE {sae_id!r} sits at block {block}, after block {deepest} whose output LLaVA's projector reads: "
            "its edits could not reach the language model", "layer")
    source = sae.cfg.source.model_id
    names = tower_names(model_name, model)
    if source is not None and not is_local_path(source) and source not in names and Path(source).name not in names:
        raise SAEMismatchError(
            f"SAE {sae_id!r} was trained on {source!r}, not on this model's vision tower ({sorted(names)})", "model")


def load_saes(paths: dict[str, str], device: str | torch.device = "cpu",
              layers: dict[str, int] | None = None) -> dict[str, SAE]:
    """SAEs by id from checkpoint paths or hub ids (any layout `load_sae` reads), in fp32 eval mode.

    `layers` sets the block of SAEs whose checkpoint does not say (the paper's releases leave it empty).
    """
    from sae_modules.formats import load_sae

    saes = {sae_id: load_sae(path, device=device).float().eval() for sae_id, path in paths.items()}
    for sae_id, layer in (layers or {}).items():
        if sae_id not in saes:
            raise EngineLoadError(f"a layer is given for SAE {sae_id!r}, which is not loaded ({sorted(saes)})")
        cfg = saes[sae_id].cfg
        saes[sae_id].cfg = cfg.model_copy(update={"source": cfg.source.model_copy(update={"layer": layer})})
    return saes
