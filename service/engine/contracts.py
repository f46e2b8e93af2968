"""Checked shapes of the tensors that cross module borders (pixels into the tower, image embeddings
into the language model), so a mismatch fails where it enters with a message naming the tensor,
its shape and the expected one, as vLLM's model inputs do, not deep inside a matmul."""

from __future__ import annotations

from torch import Tensor


class ShapeError(ValueError):
    """A tensor whose shape breaks its contract; the message names it and both shapes."""


def check_shape(name: str, tensor: Tensor, expected: tuple[int | str, ...]) -> None:
    """`expected` holds sizes, or names for free dimensions (e.g. ("n", 3, 336, 336))."""
    want = "[" + ", ".join(str(size) for size in expected) + "]"
    if tensor.ndim != len(expected):
        raise ShapeError(f"{name} must be {len(expected)}-D {want}, got shape {list(tensor.shape)}")
    for dim, (size, wanted) in enumerate(zip(tensor.shape, expected)):
        if isinstance(wanted, int) and size != wanted:
            raise ShapeError(f"{name} must have shape {want}, got {list(tensor.shape)} (dimension {dim})")


def check_pixel_values(pixel_values: Tensor, n_images: int, image_size: int) -> None:
    check_shape("pixel_values", pixel_values, (n_images, 3, image_size, image_size))


def check_image_embeds(image_embeds: Tensor, n_rows: int, width: int) -> None:
    """One image's projector output: one row per image token of the prompt, the LM's hidden width."""
    check_shape("image_embeds", image_embeds, (n_rows, width))
