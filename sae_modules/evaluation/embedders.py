"""Image (and CLIP text) embeddings from a model other than the one being measured.

The monosemanticity score compares images through a separate encoder (the paper uses DINOv2 or
CLIP ViT-B/32), and the steering score compares images and words through CLIP. An embedder is
named by a spec string so the CLI can take it as one option:
  dinov2:PATH_OR_ID           transformers Dinov2Model, pooler output (the layer-normed CLS)
  clip:PATH_OR_ID             transformers CLIPModel, projected image (and text) embeddings
  open_clip:ARCH@WEIGHTS      open_clip model `ARCH` with a local weights file
  FILE.safetensors            precomputed tensor `embeddings` [N, D], one row per image, in order
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.sources import EMBEDDINGS_KEY


class ImageEmbedder(Protocol):
    name: str

    def embed(self, images: Sequence[Image.Image], first_index: int) -> Tensor:
        """Embeddings [len(images), D] of images `first_index`, `first_index + 1`, ... of the run."""
        ...


class TextEmbedder(Protocol):
    def embed_text(self, texts: Sequence[str]) -> Tensor: ...


class Dinov2Embedder:
    def __init__(self, path: str, device: torch.device) -> None:
        from transformers import AutoImageProcessor, Dinov2Model

        self.name, self.device = f"dinov2:{path}", device
        self.model = _load(lambda: Dinov2Model.from_pretrained(path), path).to(device).eval()
        self.processor = _load(lambda: AutoImageProcessor.from_pretrained(path), path)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], first_index: int = 0) -> Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).pooler_output.float().cpu()


class ClipEmbedder:
    """CLIP's projected embeddings; the steering score also needs its text side."""

    def __init__(self, path: str, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name, self.path, self.device = f"clip:{path}", path, device
        self.model = _load(lambda: CLIPModel.from_pretrained(path), path).to(device).eval()
        self.processor = _load(lambda: AutoImageProcessor.from_pretrained(path), path)
        self._tokenizer_loader = lambda: AutoTokenizer.from_pretrained(path)
        self._tokenizer = None

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], first_index: int = 0) -> Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self.model.get_image_features(pixel_values=pixels).pooler_output.float().cpu()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """CLIP's text tower pools at the end-of-text token; a tokenizer that does not append it
        (a plain word-level one) gets it appended here, as CLIP training saw it."""
        if self._tokenizer is None:
            self._tokenizer = _load(self._tokenizer_loader, self.path)
        tok = self._tokenizer
        eos = tok.eos_token
        if eos is not None and tok("a")["input_ids"][-1] != tok.eos_token_id:
            texts = [f"{text} {eos}" for text in texts]
        side, tok.padding_side = tok.padding_side, "right"
        try:
            tokens = tok(list(texts), return_tensors="pt", padding=True).to(self.device)
        finally:
            tok.padding_side = side
        return self.model.get_text_features(input_ids=tokens["input_ids"],
                                            attention_mask=tokens["attention_mask"]).pooler_output.float().cpu()


class OpenClipEmbedder:
    def __init__(self, arch: str, weights: str, device: torch.device) -> None:
        try:
            import open_clip
        except ImportError:
            raise EvaluationError("open_clip embedders need the openclip extra: pip install 'vlm-steer[openclip]'",
                                  "embedder") from None
        if arch not in open_clip.list_models():
            raise EvaluationError(f"{arch!r} is not an open_clip model name", "embedder")
        self.name, self.device = f"open_clip:{arch}@{weights}", device
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
        self.model = self.model.to(device).eval()
        self.tokenizer = open_clip.get_tokenizer(arch)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], first_index: int = 0) -> Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        return self.model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()


class FileEmbedder:
    """Embeddings computed elsewhere; rows are looked up by image position, so the order must match."""

    def __init__(self, file: str | Path) -> None:
        self.file = Path(file)
        self.name = str(self.file)
        try:
            with safe_open(self.file, "pt") as handle:
                if EMBEDDINGS_KEY not in set(handle.keys()):
                    raise EvaluationError(f"{file} has no tensor {EMBEDDINGS_KEY!r}", "embedder")
                self.table = handle.get_tensor(EMBEDDINGS_KEY).float()
        except (OSError, FileNotFoundError) as err:
            raise EvaluationError(f"cannot read embeddings file {file}: {err}", "embedder") from None
        if self.table.ndim != 2:
            raise EvaluationError(f"{file}: embeddings must be [N, D], got {tuple(self.table.shape)}", "embedder")

    def embed(self, images: Sequence[Image.Image], first_index: int = 0) -> Tensor:
        stop = first_index + len(images)
        if stop > len(self.table):
            raise EvaluationError(f"{self.file} holds {len(self.table)} embeddings but image {stop - 1} was asked for",
                                  "embedder")
        return self.table[first_index:stop]


def load_embedder(spec: str, device: str | torch.device = "cpu") -> ImageEmbedder:
    """An embedder from its spec string (see the module docstring)."""
    device = torch.device(device)
    kind, _, rest = spec.partition(":")
    if spec.endswith(".safetensors") and not rest.startswith("//"):
        return FileEmbedder(spec)
    if kind == "dinov2" and rest:
        return Dinov2Embedder(rest, device)
    if kind == "clip" and rest:
        return ClipEmbedder(rest, device)
    if kind == "open_clip" and "@" in rest:
        arch, weights = rest.split("@", 1)
        return OpenClipEmbedder(arch, weights, device)
    raise EvaluationError(f"embedder {spec!r} is not one of dinov2:PATH, clip:PATH, open_clip:ARCH@WEIGHTS "
                          "or a .safetensors file", "embedder")


def _load(build, path: str):
    try:
        return build()
    except (OSError, ValueError) as err:
        raise EvaluationError(f"cannot load {path!r}: {str(err).splitlines()[0]}", "embedder") from None
