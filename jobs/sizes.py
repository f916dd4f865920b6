"""How a size may be written in a manifest: the syntax, without any model's limits.

A size is written as ``W*H`` (the API's own form), ``WxH`` / ``WXH`` / ``W×H`` (normalised to
``W*H``), or an aspect ratio, optionally with a pixel tier (``16:9``, ``3:4@1536``)::

    >>> read_size("1024x1024")
    Pixels(width=1024, height=1024)
    >>> read_size(" 16 : 9 @ 1280 ")
    Ratio(ratio='16:9', tier='1280')

Which sizes a model accepts, and what a ratio and tier resolve to, are that model's facts:
the caller's ``jobs.params.ModelRules`` decides (``batcher.models`` in batcher).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Pixels", "Ratio", "read_size"]


@dataclass(frozen=True, slots=True)
class Pixels:
    """A size written in pixels."""

    width: int
    height: int

    @property
    def text(self) -> str:
        """The API's form, ``W*H``."""
        return f"{self.width}*{self.height}"


@dataclass(frozen=True, slots=True)
class Ratio:
    """A size written as an aspect ratio (``16:9``), with its pixel tier if one was given."""

    ratio: str
    tier: str | None


_PIXELS = re.compile(r"(\d{1,6})\s*[*xX×]\s*(\d{1,6})", re.ASCII)
_RATIO = re.compile(r"(\d{1,3})\s*:\s*(\d{1,3})(?:\s*@\s*(\d{1,5}))?", re.ASCII)


@lru_cache(maxsize=4096)
def read_size(text: str) -> Pixels | Ratio:
    """The size ``text`` is written as; raises ``ValueError`` with a one-line message."""
    written = text.strip()
    match = _PIXELS.fullmatch(written)
    if match is not None:
        width, height = int(match[1]), int(match[2])
        if width == 0 or height == 0:
            raise ValueError(f"{width}*{height}: width and height must be positive")
        return Pixels(width, height)
    match = _RATIO.fullmatch(written)
    if match is not None:
        tier = str(int(match[3])) if match[3] else None
        return Ratio(f"{int(match[1])}:{int(match[2])}", tier)
    shown = written if len(written) <= 40 else written[:40] + "..."
    raise ValueError(
        f"{shown!r} is not a size; write W*H (e.g. 1024*1536), WxH, or a ratio such as 16:9@1280"
    )
