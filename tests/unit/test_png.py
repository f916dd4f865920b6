"""The streaming PNG checker against real PNGs (made with Pillow) cut and damaged every way."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batcher.png import PngError, PngVerifier


def png(width: int = 64, height: int = 40, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 120).save(buf, "PNG")
    return buf.getvalue()


def check(data: bytes, step: int) -> tuple[int, int]:
    v = PngVerifier()
    for i in range(0, len(data), step):
        v.feed(data[i : i + step])
    return v.finish()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1"])
@pytest.mark.parametrize("step", [1, 2, 7, 13, 64, 4096, 10**7])
def test_valid_png_in_any_chunking(mode, step):
    assert check(png(123, 45, mode), step) == (123, 45)


@given(cut=st.integers(min_value=0, max_value=10**6), step=st.integers(1, 500))
@settings(max_examples=150, deadline=None)
def test_any_truncation_is_refused(cut, step):
    data = png()
    cut = cut % len(data)
    with pytest.raises(PngError):
        check(data[:cut], step)


@given(pos=st.integers(min_value=8, max_value=10**6), bit=st.integers(0, 7))
@settings(max_examples=200, deadline=None)
def test_any_flipped_bit_after_the_signature_is_refused(pos, bit):
    data = bytearray(png())
    pos = 8 + pos % (len(data) - 8)
    data[pos] ^= 1 << bit
    with pytest.raises(PngError):
        check(bytes(data), 97)


def test_not_a_png():
    with pytest.raises(PngError, match="signature"):
        check(b"<html>error</html>" + os.urandom(64), 16)
    with pytest.raises(PngError, match="signature"):
        PngVerifier().feed(b"GIF8")


def test_trailing_garbage_is_refused():
    with pytest.raises(PngError, match="after the IEND"):
        check(png() + b"x", 10)


def test_empty_is_truncated():
    with pytest.raises(PngError, match="truncated"):
        PngVerifier().finish()
