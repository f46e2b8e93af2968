"""Turn a request's image reference into an RGB PIL image no larger than the model needs.

Order matters for safety: the encoded size is checked before base64 decoding; only the allowed
formats' parsers ever see the bytes (`Image.open(..., formats=SUPPORTED_FORMATS)`); the pixel
count is read from the header and checked against this request's `Limits` before any pixel data
is decoded (no process-wide `Image.MAX_IMAGE_PIXELS` needed; Pillow's own bomb guard stays on
underneath as a second line). With `target_short_side` set the image is shrunk at the ingress
(JPEGs already while decoding, through libjpeg's DCT scaling), so a small file that decodes to
4096² pixels is never shipped to a model replica at full size.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from typing import Any

from PIL import Image, UnidentifiedImageError

from service.api.errors import APIError
from service.api.remote_images import fetch_image
from service.config import Limits

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
RESAMPLE = Image.Resampling.BICUBIC
"""CLIP's image processor resamples bicubically; shrinking the same way makes its own resize an identity."""

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+(=[\w.+-]+)?)*),", re.ASCII)
_OTHER_FORMATS = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
                  (b"%PDF", "PDF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
                  (b"qoif", "QOI"), (b"DDS ", "DDS"))
"""Signatures of formats we refuse, only to name them in the 415 message (their parsers never run)."""
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)
"""What Pillow's parsers and decoders raise on malformed or truncated data (see tests/test_fuzz_images.py)."""


def _b64_bytes(payload: str, limits: Limits, param: str) -> bytes:
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(413, f"image exceeds {limits.max_image_bytes} bytes", param)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"image is not valid base64: {exc}", param) from exc


def image_bytes(ref: str, limits: Limits, param: str = "image") -> bytes:
    """The encoded image bytes behind a data URL, bare base64 or (if allowed) an http(s) URL."""
    if not ref:
        raise APIError(400, "image is empty", param)
    if ref.startswith(("http://", "https://")):
        return fetch_image(ref, limits, param)
    if ref.startswith("data:"):
        match = _DATA_URL.match(ref)
        if match is None:
            raise APIError(400, "malformed data URL: expected data:image/<type>;base64,<data>", param)
        mime = match["mime"] or "text/plain"
        if not mime.startswith("image/"):
            raise APIError(415, f"unsupported media type {mime!r}: send an image", param)
        if ";base64" not in (match["params"] or ""):
            raise APIError(400, "data URL must be base64-encoded (data:image/png;base64,...)", param)
        return _b64_bytes(ref[match.end():], limits, param)
    return _b64_bytes(ref, limits, param)


def _unsupported(data: bytes, param: str) -> APIError:
    named = next((name for signature, name in _OTHER_FORMATS if data.startswith(signature)), None)
    what = f"unsupported image format {named}" if named else "not a supported image"
    return APIError(415, f"{what}; use one of {', '.join(SUPPORTED_FORMATS)}", param)


def shrunk_size(size: tuple[int, int], target_short_side: int) -> tuple[int, int]:
    """(width, height) with the short side `target_short_side`, the long side as CLIP's processor computes it.

    CLIPImageProcessor's `shortest_edge` resize truncates the long side (`int(target * long / short)`),
    so an image already at this size passes through the processor's resize unchanged."""
    width, height = size
    short, long = min(width, height), max(width, height)
    other = int(target_short_side * long / short)
    return (target_short_side, other) if width <= height else (other, target_short_side)


def processor_short_side(image_processor: Any) -> int | None:
    """The short side a Hugging Face image processor resizes to: what `target_short_side` should be.

    `size["shortest_edge"]` (CLIP, LLaVA-1.5), or the larger side of a fixed `height` x `width`
    resize (shrinking the short side to it keeps both sides at least as large as the resize's);
    None when the processor does not resize or says nothing usable (then nothing is shrunk)."""
    if not getattr(image_processor, "do_resize", False):
        return None
    size = getattr(image_processor, "size", None) or {}
    if size.get("shortest_edge"):
        return int(size["shortest_edge"])
    if size.get("height") and size.get("width"):
        return int(max(size["height"], size["width"]))
    return None


def decode_image(
    data: bytes, limits: Limits, param: str = "image", target_short_side: int | None = None
) -> Image.Image:
    """An RGB image from encoded bytes, or an APIError: 413 too large, 415 unsupported, 400 corrupt.

    `target_short_side`: shrink (never enlarge) so the short side is this many pixels; the model
    replica's processor resizes to it anyway. None keeps the decoded size."""
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"image exceeds {limits.max_image_bytes} bytes", param)
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise _unsupported(data, param) from exc
    except Image.DecompressionBombError as exc:
        raise APIError(413, f"image is too large to decode safely: {exc}", param) from exc
    except _CORRUPT as exc:
        raise APIError(400, f"image is truncated or corrupt: {exc}", param) from exc
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise APIError(400, "image has no pixels", param)
        if width * height > limits.max_image_pixels:
            raise APIError(
                413, f"image has {width}x{height} pixels, more than the limit {limits.max_image_pixels}", param
            )
        shrink = target_short_side is not None and min(width, height) > target_short_side
        try:
            if shrink:
                image.draft("RGB", shrunk_size((width, height), target_short_side))
            image.load()
            rgb = image.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise APIError(413, f"image is too large to decode safely: {exc}", param) from exc
        except _CORRUPT as exc:
            raise APIError(400, f"image is truncated or corrupt: {exc}", param) from exc
    if shrink and min(rgb.size) > target_short_side:
        rgb = rgb.resize(shrunk_size(rgb.size, target_short_side), RESAMPLE)
    return rgb


def load_image(
    ref: str, limits: Limits, param: str = "image", target_short_side: int | None = None
) -> Image.Image:
    """`decode_image` of `image_bytes`: what the routes call (in a worker thread) for each request image."""
    return decode_image(image_bytes(ref, limits, param), limits, param, target_short_side)
