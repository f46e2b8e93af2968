"""Turn a request's image reference into an RGB PIL image, refusing anything too big before it is decoded.

Order matters for safety: the encoded size is checked before base64 decoding, the pixel count
from the header (`Image.open(...).size`, no pixel data read) before `load()`, and Pillow's own
decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, set to the same limit by the app; it raises
past twice that) stays on underneath. Remote URLs are refused unless the config allows them.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import httpx
from PIL import Image, UnidentifiedImageError

from service.api.errors import APIError
from service.config import Limits

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+(=[\w.+-]+)?)*),", re.ASCII)


def _b64_bytes(payload: str, limits: Limits, param: str) -> bytes:
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(413, f"image exceeds {limits.max_image_bytes} bytes", param)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"image is not valid base64: {exc}", param) from exc


def _fetch(url: str, limits: Limits, param: str) -> bytes:
    if not limits.allow_remote_images:
        raise APIError(400, "remote image URLs are disabled on this server; send a data URL or base64", param)
    try:
        with httpx.stream("GET", url, timeout=limits.remote_image_timeout_s, follow_redirects=False) as response:
            if response.status_code != 200:
                raise APIError(400, f"fetching the image returned HTTP {response.status_code}", param)
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > limits.max_image_bytes:
                    raise APIError(413, f"image exceeds {limits.max_image_bytes} bytes", param)
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise APIError(400, f"cannot fetch the image: {exc}", param) from exc
    return b"".join(chunks)


def image_bytes(ref: str, limits: Limits, param: str = "image") -> bytes:
    """The encoded image bytes behind a data URL, bare base64 or (if allowed) an http(s) URL."""
    if not ref:
        raise APIError(400, "image is empty", param)
    if ref.startswith(("http://", "https://")):
        return _fetch(ref, limits, param)
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


def decode_image(data: bytes, limits: Limits, param: str = "image") -> Image.Image:
    """An RGB image from encoded bytes, or an APIError: 413 too large, 415 unsupported, 400 corrupt."""
    if len(data) > limits.max_image_bytes:
        raise APIError(413, f"image exceeds {limits.max_image_bytes} bytes", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=None)
            if image.format not in SUPPORTED_FORMATS:
                raise APIError(
                    415, f"unsupported image format {image.format}; use one of {', '.join(SUPPORTED_FORMATS)}", param
                )
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise APIError(413, f"image has {width}x{height} pixels, more than the limit {limits.max_image_pixels}",
                               param)
            if width < 1 or height < 1:
                raise APIError(400, "image has no pixels", param)
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError as exc:
        raise APIError(415, f"not a supported image; use one of {', '.join(SUPPORTED_FORMATS)}", param) from exc
    except Image.DecompressionBombError as exc:
        raise APIError(413, f"image is too large to decode safely: {exc}", param) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise APIError(400, f"image is truncated or corrupt: {exc}", param) from exc


def load_image(ref: str, limits: Limits, param: str = "image") -> Image.Image:
    return decode_image(image_bytes(ref, limits, param), limits, param)
