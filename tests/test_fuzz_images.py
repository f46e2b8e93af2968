"""Fuzz the ingress image decoder with malformed and truncated files of every allowed format.

Whatever the bytes, `decode_image` must return an RGB image within the limits or raise an
APIError with a 4xx status: no other exception (that would be a 500), no oversized image.
The default run is short; `make fuzz` sets VLM_STEER_FUZZ_EXAMPLES for a long one.
"""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.api.errors import APIError
from service.api.images import decode_image
from service.config import Limits
from tests.service_fixtures import noise_image

EXAMPLES = int(os.environ.get("VLM_STEER_FUZZ_EXAMPLES", "300"))
LIMITS = Limits(max_image_pixels=96 * 96, max_image_bytes=64_000)
TARGET = 32


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    """Valid files of each allowed format in the variants whose decoders differ (palette, interlace, animation)."""
    rgb = noise_image(7, (40, 36))
    frames = [noise_image(i, (40, 36)).convert("P") for i in range(3)]
    return {
        "png": _save(rgb, "PNG"),
        "png-palette-interlaced": _save(rgb.convert("P"), "PNG", interlace=1),
        "png-rgba": _save(rgb.convert("RGBA"), "PNG"),
        "png-16bit-grey": _save(rgb.convert("I;16"), "PNG"),
        "jpeg": _save(rgb, "JPEG", quality=80),
        "jpeg-progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg-grey": _save(rgb.convert("L"), "JPEG"),
        "webp-lossy": _save(rgb, "WEBP", quality=70),
        "webp-lossless": _save(rgb, "WEBP", lossless=True),
        "webp-animated": _save(frames[0].convert("RGB"), "WEBP", save_all=True,
                               append_images=[f.convert("RGB") for f in frames[1:]]),
        "gif": _save(rgb.convert("P"), "GIF"),
        "gif-animated": _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "bmp": _save(rgb, "BMP"),
        "bmp-palette": _save(rgb.convert("P"), "BMP"),
        "bmp-1bit": _save(rgb.convert("1"), "BMP"),
    }


SEEDS = _seeds()


@st.composite
def malformed(draw: st.DrawFn) -> bytes:
    """A seed file truncated, with bytes overwritten (header fields included), inserted or deleted."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["truncate", "overwrite", "header", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "overwrite":
            data[at:at + 4] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "header":
            at = draw(st.integers(0, min(len(data), 64) - 1))
            data[at:at + 2] = draw(st.sampled_from([b"\xff\xff", b"\x00\x00", b"\x7f\xff", b"\x80\x00"]))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:
            del data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


def _check(data: bytes) -> None:
    try:
        image = decode_image(data, LIMITS, "image", target_short_side=TARGET)
    except APIError as error:
        assert 400 <= error.status < 500 and error.param == "image" and error.message
        return
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    assert image.width * image.height <= LIMITS.max_image_pixels
    assert min(image.size) <= TARGET


def test_every_seed_is_a_valid_image() -> None:
    for name, data in SEEDS.items():
        image = decode_image(data, LIMITS, "image", target_short_side=TARGET)
        assert min(image.size) == TARGET, name


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_truncation_point_of_every_seed(name: str) -> None:
    data = SEEDS[name]
    step = max(1, len(data) // 200)
    for end in range(0, len(data), step):
        _check(data[:end])


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=malformed())
def test_malformed_files_give_a_4xx_or_a_valid_image(data: bytes) -> None:
    _check(data)


@settings(max_examples=max(50, EXAMPLES // 4), deadline=None, database=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_give_a_4xx(data: bytes) -> None:
    _check(data)
