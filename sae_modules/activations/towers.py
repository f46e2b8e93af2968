"""Load a CLIP vision tower, alone, with its image preprocessing, behind one small interface.

Only the tower's weights are read, even from a LLaVA checkpoint: the 7B language model is never
built, so extraction fits wherever the tower fits. Checkpoint key layouts differ between
libraries and releases (`vision_model.`, `vision_tower.`, `model.vision_tower.`), so keys are
matched by stripping known prefixes rather than by one fixed path.

Besides its blocks, a tower offers the layer "last": its image embedding, one vector per image.
That is CLIP's visual projection of the pooled CLS token (768-d for ViT-L/14, the layer the
paper's iNaturalist rows use) when the checkpoint has the projection (CLIPModel,
CLIPVisionModelWithProjection, open_clip), else the pooled output itself (a bare
CLIPVisionModel, LLaVA's tower), which is what a classifier head on the tower reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from sae_modules.activations.blocks import (
    LAST_LAYER,
    Layer,
    capture_block_output,
    resolve_layer,
    vision_blocks,
)
from sae_modules.activations.errors import ExtractError

OPEN_CLIP_PREFIX = "open_clip:"
_PROJECTION = "visual_projection.weight"
_CHECKPOINT_PREFIXES = (
    "",
    "vision_model.",
    "vision_tower.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "model.vision_tower.vision_model.",
)
_SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class Tower:
    """A vision tower ready to run: `layer_output` gives one block's output, or the image embedding
    ("last"), for a pixel batch."""

    name: str
    module: nn.Module
    blocks: nn.ModuleList
    n_tokens: int
    d_model: int
    embedding_width: int
    device: torch.device
    _preprocess: Callable[[Sequence[Image.Image]], Tensor]
    _forward: Callable[[Tensor], object]
    _embed: Callable[[Tensor], Tensor]
    _seq_first: bool = False

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """RGB images -> the pixel tensor [B, 3, H, W] this tower was trained on."""
        return self._preprocess(images)

    def block_index(self, layer: Layer) -> Layer:
        """A block index in [0, blocks), or "last" as it is."""
        if layer == LAST_LAYER:
            return LAST_LAYER
        try:
            return resolve_layer(layer, len(self.blocks))
        except ValueError as err:
            raise ExtractError(f"--layer: {err}") from None

    def tokens_at(self, layer: Layer) -> int:
        return 1 if layer == LAST_LAYER else self.n_tokens

    def width_at(self, layer: Layer) -> int:
        return self.embedding_width if layer == LAST_LAYER else self.d_model

    @torch.no_grad()
    def layer_output(self, pixels: Tensor, layer: Layer) -> Tensor:
        """Block `layer`'s output [B, T, D] (= hidden_states[layer + 1]), blocks above it not run; or, for
        "last", the image embedding as one token [B, 1, E]."""
        index = self.block_index(layer)
        pixels = pixels.to(self.device, next(self.module.parameters()).dtype)
        if index == LAST_LAYER:
            return self._embed(pixels)[:, None, :]
        with capture_block_output(self.blocks[index], stop=True) as captured:
            self._forward(pixels)
        output = captured.output
        return output.transpose(0, 1) if self._seq_first else output


def parse_layer(text: str) -> Layer:
    """A command-line layer: a block index (negative from the end) or "last"; ValueError otherwise."""
    if text.strip() == LAST_LAYER:
        return LAST_LAYER
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a block index nor '{LAST_LAYER}'") from None


def resolve_device(device: str) -> torch.device:
    """'auto' picks the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ExtractError(
            f"--device: {device!r} is not a torch device (try auto, cpu, cuda, cuda:1)"
        ) from None


def load_tower(model: str, weights: str | None = None, device: str = "auto") -> Tower:
    """A tower from a transformers checkpoint (hub id or local dir) or `open_clip:NAME` + a weights file."""
    torch_device = resolve_device(device)
    if model.startswith(OPEN_CLIP_PREFIX):
        tower = _load_open_clip(model, weights, torch_device)
    else:
        if weights is not None:
            raise ExtractError(
                "--weights is only for open_clip models; a transformers checkpoint carries its own"
            )
        tower = _load_transformers(model, torch_device)
    tower.module.to(torch_device).eval()
    return tower


def _fetch(model: str, filename: str) -> Path | None:
    """A checkpoint file from a local directory or the hub (cache included); None when absent."""
    local = Path(model)
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    if local.exists():
        raise ExtractError(f"--model: {model} is a file; give a checkpoint directory or a hub id")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    try:
        return Path(hf_hub_download(model, filename))
    except EntryNotFoundError:
        return None
    except HFValidationError:
        raise ExtractError(f"--model: {model!r} is neither a directory nor a hub id") from None
    except Exception as err:  # network, auth, missing repo: all mean the same thing to the user
        raise ExtractError(f"--model: cannot fetch {filename} of {model!r}: {type(err).__name__}") from None


def _vision_config(config: dict, model: str) -> dict:
    if config.get("model_type") == "clip_vision_model":
        return config
    vision = config.get("vision_config")
    if isinstance(vision, dict) and vision.get("model_type", "clip_vision_model") == "clip_vision_model":
        return vision
    raise ExtractError(
        f"--model: {model!r} ({config.get('model_type')}) has no CLIP vision tower; "
        "expected CLIPVisionModel, CLIPModel or a LLaVA checkpoint"
    )


def _checkpoint_tensors(model: str, wanted: set[str]) -> dict[str, Tensor]:
    """The tower's tensors, renamed to CLIPVisionModel's keys; other tensors are never read."""
    from safetensors import safe_open

    def rename(key: str) -> str | None:
        for prefix in _CHECKPOINT_PREFIXES:
            if key.startswith(prefix) and key[len(prefix) :] in wanted:
                return key[len(prefix) :]
        return None

    index = _fetch(model, _SAFETENSORS_INDEX)
    if index is not None:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({file for key, file in weight_map.items() if rename(key)})
    else:
        files = ["model.safetensors"]
    tensors: dict[str, Tensor] = {}
    for name in files:
        path = _fetch(model, name)
        if path is None:
            break
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if (target := rename(key)) is not None:
                    tensors[target] = handle.get_tensor(key)
    else:
        return tensors
    legacy = _fetch(model, "pytorch_model.bin")
    if legacy is None:
        raise ExtractError(f"--model: {model!r} has no model.safetensors or pytorch_model.bin")
    state = torch.load(legacy, map_location="cpu", weights_only=True)
    return {target: tensor for key, tensor in state.items() if (target := rename(key)) is not None}


def _load_transformers(model: str, device: torch.device) -> Tower:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
    )

    config_file = _fetch(model, "config.json")
    if config_file is None:
        raise ExtractError(f"--model: {model!r} not found (no config.json locally or in the hub cache)")
    config = CLIPVisionConfig.from_dict(_vision_config(json.loads(config_file.read_text()), model))
    with torch.device("meta"):  # key names only: no weights allocated or initialised
        wanted = set(CLIPVisionModel(config).state_dict())
    tensors = _checkpoint_tensors(model, wanted | {_PROJECTION})
    projection = tensors.pop(_PROJECTION, None)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ExtractError(f"--model: {model!r} lacks vision-tower weights, e.g. {missing[:3]}")
    if projection is None:
        tower = CLIPVisionModel(config)
        tower.load_state_dict(tensors, strict=True)
        embed = lambda pixels: tower(pixel_values=pixels).pooler_output
    else:
        if projection.ndim != 2 or projection.shape[1] != config.hidden_size:
            raise ExtractError(f"--model: {model!r} has a visual projection of shape {tuple(projection.shape)}, "
                               f"which does not take the tower's width {config.hidden_size}")
        config.projection_dim = projection.shape[0]
        tower = CLIPVisionModelWithProjection(config)
        tower.load_state_dict({f"vision_model.{key}": value for key, value in tensors.items()}
                              | {_PROJECTION: projection}, strict=True)
        embed = lambda pixels: tower(pixel_values=pixels).image_embeds

    processor_file = _fetch(model, "preprocessor_config.json")
    if processor_file is not None:
        processor = CLIPImageProcessor.from_pretrained(str(processor_file.parent))
    else:
        side = config.image_size
        processor = CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
    return Tower(
        name=model,
        module=tower,
        blocks=vision_blocks(tower),
        n_tokens=(config.image_size // config.patch_size) ** 2 + 1,
        d_model=config.hidden_size,
        embedding_width=config.hidden_size if projection is None else projection.shape[0],
        device=device,
        _preprocess=lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"],
        _forward=lambda pixels: tower(pixel_values=pixels),
        _embed=embed,
    )


def _load_open_clip(model: str, weights: str | None, device: torch.device) -> Tower:
    name = model.removeprefix(OPEN_CLIP_PREFIX)
    try:
        import open_clip
    except ImportError:
        raise ExtractError(
            "open_clip models need the openclip extra: pip install 'vlm-steer[openclip]'"
        ) from None
    if weights is None:
        raise ExtractError(
            f"--weights: {model} needs a weights file (.safetensors, or a state dict .pt/.bin)"
        )
    if name not in open_clip.list_models():
        raise ExtractError(f"--model: {name!r} is not an open_clip model name (see open_clip.list_models())")
    state = _open_clip_state(Path(weights))
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExtractError(f"--weights: {weights} does not fit {name}: {str(err).splitlines()[0]}") from None
    visual = clip.visual
    transformer = visual.transformer
    grid = visual.grid_size
    return Tower(
        name=model,
        module=visual,
        blocks=transformer.resblocks,
        n_tokens=grid[0] * grid[1] + 1,
        d_model=transformer.width,
        embedding_width=visual.output_dim,
        device=device,
        _preprocess=lambda images: torch.stack([preprocess(image) for image in images]),
        _forward=visual,
        _embed=visual,
        _seq_first=not getattr(transformer, "batch_first", True),
    )


def _open_clip_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ExtractError(f"--weights: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExtractError(f"--weights: {path} is not a readable state dict ({type(err).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ExtractError(f"--weights: {path} holds a {type(state).__name__}, not a state dict")
    return {key.removeprefix("module."): value for key, value in state.items()}
