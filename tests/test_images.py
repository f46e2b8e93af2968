"""The ingress image decoder: allowed formats only, pixel limits from the header, shrinking to what the model needs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from service.api.errors import APIError
from service.api.images import SUPPORTED_FORMATS, decode_image, load_image, processor_short_side, shrunk_size
from service.config import Limits
from tests.service_fixtures import data_url, encoded, noise_image

LIMITS = Limits(max_image_pixels=4096 * 4096)


def _refusal(data: bytes, limits: Limits = LIMITS, **kwargs) -> APIError:
    with pytest.raises(APIError) as caught:
        decode_image(data, limits, "messages.0.content.1.image_url.url", **kwargs)
    assert caught.value.param == "messages.0.content.1.image_url.url"
    return caught.value


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming `width` x `height` whose image data is 4 junk bytes: decoding it would fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"junk")


@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
def test_every_allowed_format_decodes_to_its_pixels(fmt: str) -> None:
    original = noise_image(3, (24, 20))
    decoded = decode_image(encoded(original, fmt), LIMITS)
    assert decoded.mode == "RGB" and decoded.size == (24, 20)
    expected = np.asarray(Image.open(io.BytesIO(encoded(original, fmt))).convert("RGB"), dtype=np.int16)
    assert np.array_equal(np.asarray(decoded, dtype=np.int16), expected)
    if fmt in ("PNG", "BMP"):
        assert np.array_equal(np.asarray(decoded), np.asarray(original))


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PCX", "TGA", "PPM"])
def test_formats_pillow_reads_but_we_do_not_allow_are_refused(fmt: str) -> None:
    error = _refusal(encoded(noise_image(0, (16, 16)), fmt))
    assert error.status == 415 and "PNG, JPEG, WEBP, GIF, BMP" in error.message
    if fmt in ("TIFF", "ICO"):
        assert f"unsupported image format {fmt}" in error.message


def test_pixel_limit_is_read_from_the_header_before_any_pixel_is_decoded() -> None:
    header = _png_header_only(5000, 5000)
    assert len(header) < 60
    error = _refusal(header)
    assert error.status == 413 and "5000x5000" in error.message
    assert _refusal(_png_header_only(60_000, 60_000)).status == 413
    small = Limits(max_image_pixels=100 * 100)
    assert _refusal(encoded(Image.new("RGB", (101, 100))), small).status == 413
    assert decode_image(encoded(Image.new("RGB", (100, 100))), small).size == (100, 100)


def test_the_decoder_needs_no_process_wide_pillow_limit() -> None:
    """The limit comes from `Limits`, whatever `Image.MAX_IMAGE_PIXELS` says (the app no longer sets it)."""
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 10**12
        assert _refusal(encoded(Image.new("RGB", (300, 300))), Limits(max_image_pixels=200 * 200)).status == 413
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_truncated_and_empty_images_are_400() -> None:
    png = encoded(noise_image(0, (40, 40)))
    assert _refusal(png[: len(png) // 2]).status == 400
    assert _refusal(_png_header_only(8, 8)).status == 400
    assert _refusal(b"").status == 415


def test_a_small_file_of_4096_squared_pixels_is_shrunk_at_the_ingress() -> None:
    big = Image.new("RGB", (4096, 4096), (200, 30, 30))
    png = encoded(big)
    assert len(png) < 100_000, "the issue's case: a small file that decodes to 48 MB"
    shrunk = load_image(data_url(big), LIMITS, target_short_side=336)
    assert shrunk.size == (336, 336) and shrunk.mode == "RGB"
    assert shrunk.getpixel((100, 200)) == (200, 30, 30)
    wide = decode_image(encoded(Image.new("RGB", (4096, 1024))), LIMITS, target_short_side=336)
    assert wide.size == (1344, 336)
    small = noise_image(1, (200, 100))
    assert decode_image(encoded(small), LIMITS, target_short_side=336).size == (200, 100)
    assert decode_image(png, LIMITS).size == (4096, 4096)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_shrinking_first_leaves_the_clip_processor_output_unchanged(fmt: str) -> None:
    """What the model sees from the shrunk image matches what it sees from the full one (JPEG: DCT-scaled)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    photo = Image.fromarray(coarse).resize((900, 1200), Image.Resampling.BICUBIC)
    data = encoded(photo, fmt)
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    full = processor(images=[decode_image(data, LIMITS)], return_tensors="np").pixel_values
    shrunk_image = decode_image(data, LIMITS, target_short_side=336)
    assert shrunk_image.size == shrunk_size((900, 1200), 336) == (336, 448)
    shrunk = processor(images=[shrunk_image], return_tensors="np").pixel_values
    assert full.shape == shrunk.shape == (1, 3, 336, 336)
    tolerance = 0.02 if fmt == "PNG" else 0.05
    assert np.abs(full - shrunk).mean() < tolerance


def test_the_short_side_comes_from_the_models_image_processor(tiny_llava_dir) -> None:
    from transformers import AutoProcessor

    assert processor_short_side(AutoProcessor.from_pretrained(tiny_llava_dir).image_processor) == 56
    assert processor_short_side(CLIPImageProcessor(size={"shortest_edge": 336})) == 336
    assert processor_short_side(CLIPImageProcessor(size={"height": 224, "width": 300}, do_center_crop=False)) == 300
    assert processor_short_side(CLIPImageProcessor(do_resize=False)) is None
