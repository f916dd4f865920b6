"""Cheap, recognisable PNGs: the prompt's words on a colour derived from the prompt.

An image is drawn at download time from ``(prompt, seed, width, height)`` and never stored, so
the emulator keeps only the small request parameters of the images it issued.

Why it is fast enough for 1,000 images a second on one core:

* a palette image of three colours (background, ink, accent) written as a 2-bit PNG by hand:
  a quarter of the bytes of a greyscale image and 1/12 of RGB to deflate, at level 1, with no
  filtering to try (Pillow's own PNG writer tries filters and took twice as long; its 1-bit
  packer is 7 times slower than its 2-bit one);
* glyphs are rasterised once per font size and character (a bounded cache) and then blitted,
  because asking FreeType for a whole line costs ~5 us per character every time;
* no anti-aliasing, no layout engine, no per-image font loading.

What it shows: the prompt wrapped to the width (cut with an ellipsis when it does not fit), a
footer ``seed N · W×H`` and a 64-cell bar code of a hash of all four values, so two requests
that differ in anything give different pixels (hence different sha256), while the same request
always gives the same bytes. The prompt is also stored in an ``iTXt`` chunk.

CJK prompts use a CJK-capable system font when one is found (Noto Sans CJK, WenQuanYi, Droid
Sans Fallback, Source Han, ...; ``BATCHER_EMULATOR_FONT`` names one explicitly); otherwise the
glyphs render as the font's placeholder box. Nothing here can fail on odd text.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["find_font", "render_png"]

_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    str(Path.home() / ".fonts"),
    str(Path.home() / ".local/share/fonts"),
    "/System/Library/Fonts",
    "/Library/Fonts",
    "C:/Windows/Fonts",
)
# Most specific first: fonts known to cover CJK, then a good Latin font.
_FONT_PATTERNS = (
    "**/NotoSansCJK*-Regular.tt[cf]",
    "**/NotoSansCJK*.otf",
    "**/NotoSans*CJK*",
    "**/SourceHanSans*",
    "**/wqy-microhei.ttc",
    "**/wqy-zenhei.ttc",
    "**/DroidSansFallback*.ttf",
    "**/uming.ttc",
    "**/PingFang.ttc",
    "**/msyh.tt[cf]",
    "**/DejaVuSans.ttf",
)
_GLYPH_CACHE_LIMIT = 4096
_BAR_CELLS = 64
_PAD = 4  # four 2-bit pixels: one byte
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@functools.cache
def find_font() -> str | None:
    """The path of the font to draw with (CJK-capable if the system has one), or None."""
    explicit = os.environ.get("BATCHER_EMULATOR_FONT")
    if explicit and Path(explicit).is_file():
        return explicit
    roots = [Path(d) for d in _FONT_DIRS if Path(d).is_dir()]
    for pattern in _FONT_PATTERNS:
        for root in roots:
            for path in sorted(root.glob(pattern)):
                if path.is_file():
                    return str(path)
    return None


@dataclass(frozen=True, slots=True)
class _Glyph:
    mask: Any  # Pillow's internal ImagingCore, or None for blank glyphs
    dx: int
    dy: int
    advance: float


class _Face:
    """A font at one pixel size with its rasterised glyphs."""

    def __init__(self, size: int) -> None:
        path = find_font()
        font: ImageFont.FreeTypeFont | ImageFont.ImageFont | None
        try:
            if path is not None:
                font = ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)
            else:
                font = ImageFont.load_default(size)
        except OSError:
            font = None
        self.font = font if isinstance(font, ImageFont.FreeTypeFont) else None
        if self.font is not None:
            ascent, descent = self.font.getmetrics()
        else:
            ascent, descent = size, size // 4
        self.line_height = ascent + descent + max(1, size // 6)
        self._glyphs: dict[str, _Glyph] = {}

    def glyph(self, char: str) -> _Glyph:
        found = self._glyphs.get(char)
        if found is not None:
            return found
        if len(self._glyphs) >= _GLYPH_CACHE_LIMIT:
            self._glyphs.clear()
        glyph = self._rasterise(char)
        self._glyphs[char] = glyph
        return glyph

    def _rasterise(self, char: str) -> _Glyph:
        if self.font is None:
            return _Glyph(mask=None, dx=0, dy=0, advance=0.0)
        try:
            advance = self.font.getlength(char)
            mask, (dx, dy) = self.font.getmask2(char, mode="1")
        except (OSError, ValueError):  # a character FreeType cannot handle at all
            return _Glyph(mask=None, dx=0, dy=0, advance=0.0)
        width, height = mask.size
        return _Glyph(mask=mask if width and height else None, dx=dx, dy=dy, advance=advance)

    def width(self, text: str) -> float:
        glyphs = self._glyphs
        total = 0.0
        for char in text:
            total += (glyphs.get(char) or self.glyph(char)).advance
        return total


@functools.lru_cache(maxsize=16)
def _face(size: int) -> _Face:
    return _Face(size)


def render_png(*, prompt: str, seed: int, width: int, height: int) -> bytes:
    """A ``width`` x ``height`` PNG showing ``prompt`` and ``seed``; deterministic.

    >>> render_png(prompt="a red fox", seed=1, width=512, height=512)[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    background = _colour(hashlib.sha256(prompt.encode("utf-8", "replace")).digest())
    ink = (24, 24, 24) if _luminance(background) > 140 else (240, 240, 240)
    accent = tuple((b + i) // 2 for b, i in zip(background, ink, strict=True))
    # The canvas has _PAD extra columns on the left, kept at index 0: packed at 2 bits a pixel
    # they are the zero byte that starts each PNG scanline (filter type None), so the packed
    # canvas is the PNG's scanline data as it is.
    canvas = Image.new("P", (width + _PAD, height), 0)

    short = min(width, height)
    face = _face(max(8, min(96, short // 16)))
    small = _face(max(8, min(48, short // 32)))  # the footer must fit on one line
    margin = max(1, short // 24)
    left = _PAD + margin
    bar_height = max(2, height // 64)
    footer_top = height - bar_height - margin - small.line_height
    draw = ImageDraw.Draw(canvas).draw
    max_lines = max(0, (footer_top - margin) // face.line_height)
    y = margin
    for line in _wrap(face, prompt, width - 2 * margin, max_lines):
        _draw_line(draw, face, line, left, y, 1)
        y += face.line_height
    _draw_line(draw, small, f"seed {seed} · {width}×{height}", left, max(0, footer_top), 2)

    digest = hashlib.sha256(f"{prompt}\0{seed}\0{width}*{height}".encode("utf-8", "replace"))
    bits = int.from_bytes(digest.digest()[:8], "big")
    cells = bytes(1 + ((bits >> i) & 1) for i in range(_BAR_CELLS))
    bar = Image.frombytes("P", (_BAR_CELLS, 1), cells).resize(
        (width, bar_height), Image.Resampling.NEAREST
    )
    canvas.paste(bar, (_PAD, height - bar_height))
    canvas.paste(0, (0, 0, _PAD, height))  # a glyph with a negative bearing may have reached in

    palette = bytes([*background, *ink, *accent])
    scanlines = canvas.tobytes("raw", "P;2")
    return b"".join(
        (
            _PNG_SIGNATURE,
            _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 2, 3, 0, 0, 0)),
            _chunk(b"PLTE", palette),
            _chunk(b"tEXt", f"Comment\0seed={seed} size={width}*{height}".encode("latin-1")),
            _chunk(b"iTXt", b"Description\0\0\0\0\0" + prompt.encode("utf-8", "replace")),
            _chunk(b"IDAT", zlib.compress(scanlines, 1)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return b"".join(
        (
            struct.pack(">I", len(data)),
            kind,
            data,
            struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))),
        )
    )


def _draw_line(draw: Any, face: _Face, text: str, x0: int, y: int, ink: int) -> None:
    glyphs = face._glyphs
    blit = draw.draw_bitmap
    x = float(x0)
    for char in text:
        glyph = glyphs.get(char) or face.glyph(char)
        if glyph.mask is not None:
            blit((int(x + 0.5) + glyph.dx, y + glyph.dy), glyph.mask, ink)
        x += glyph.advance


def _wrap(face: _Face, text: str, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap by pixel width; long words (and CJK runs) break anywhere."""
    if max_lines <= 0 or face.font is None:
        return []
    lines: list[str] = []
    current, current_width = "", 0.0
    space = face.glyph(" ").advance
    for word in text.split():
        word_width = face.width(word)
        if current and current_width + space + word_width <= max_width:
            current, current_width = f"{current} {word}", current_width + space + word_width
            continue
        if current:
            lines.append(current)
        current, current_width = "", 0.0
        while word_width > max_width and len(word) > 1:
            cut, cut_width = _fit(face, word, max_width)
            lines.append(word[:cut])
            word, word_width = word[cut:], word_width - cut_width
        current, current_width = word, word_width
        if len(lines) >= max_lines:
            break
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and face.width(last + "…") > max_width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def _fit(face: _Face, word: str, max_width: int) -> tuple[int, float]:
    """How many leading characters of ``word`` fit in ``max_width`` (at least one)."""
    total = 0.0
    for index, char in enumerate(word):
        advance = face.glyph(char).advance
        if index and total + advance > max_width:
            return index, total
        total += advance
    return len(word), total


def _colour(digest: bytes) -> tuple[int, int, int]:
    """A mid-saturated colour from a hash: never too close to black or white."""
    return (48 + digest[0] * 160 // 255, 48 + digest[1] * 160 // 255, 48 + digest[2] * 160 // 255)


def _luminance(rgb: tuple[int, int, int]) -> float:
    red, green, blue = rgb
    return 0.299 * red + 0.587 * green + 0.114 * blue
