"""Image sizes: the forms a manifest may write, resolved to the API's ``W*H``.

A size is written as ``W*H`` (the API's own form), ``WxH`` / ``WXH`` (normalised to ``W*H``),
or an aspect ratio from the service's recommended table, optionally with its pixel tier::

    >>> parse_size("1024x1024")
    '1024*1024'
    >>> parse_size("16:9")          # tier @1280 unless given
    '1536*864'
    >>> parse_size("3:4@1536")
    '1296*1728'

The table and the limits are the service's documented ones (README, "Manifests"): total pixels in
512*512..2048*2048; no aspect-ratio or divisibility rule is documented, so none is enforced.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = [
    "DEFAULT_SIZE",
    "DEFAULT_TIER",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "RECOMMENDED",
    "TIERS",
    "parse_size",
]

MIN_PIXELS = 512 * 512
MAX_PIXELS = 2048 * 2048
DEFAULT_SIZE = "1024*1536"  # the API's default, stored explicitly so a job records it
TIERS = ("1024", "1280", "1536")
DEFAULT_TIER = "1280"

# ratio -> sizes at the ~1024², ~1280² and ~1536² pixel budgets (the order of TIERS).
RECOMMENDED: dict[str, tuple[str, str, str]] = {
    "1:1": ("1024*1024", "1280*1280", "1536*1536"),
    "2:3": ("832*1248", "1024*1536", "1248*1872"),
    "3:2": ("1248*832", "1536*1024", "1872*1248"),
    "3:4": ("864*1152", "1104*1472", "1296*1728"),
    "4:3": ("1152*864", "1472*1104", "1728*1296"),
    "7:9": ("896*1152", "1120*1440", "1344*1728"),
    "9:7": ("1152*896", "1440*1120", "1728*1344"),
    "9:16": ("720*1280", "864*1536", "1152*2048"),
    "9:21": ("576*1344", "720*1680", "864*2016"),
    "16:9": ("1280*720", "1536*864", "2048*1152"),
    "21:9": ("1344*576", "1680*720", "2016*864"),
}

_PIXELS = re.compile(r"(\d{1,6})\s*[*xX×]\s*(\d{1,6})", re.ASCII)
_RATIO = re.compile(r"(\d{1,3})\s*:\s*(\d{1,3})(?:\s*@\s*(\d{1,5}))?", re.ASCII)
_RATIOS = ", ".join(RECOMMENDED)


@lru_cache(maxsize=4096)
def parse_size(text: str) -> str:
    """Resolve a written size to ``"W*H"``.

    Raises ``ValueError`` whose message is one line suitable for a manifest error, e.g.
    ``4096*4096 is outside 512*512..2048*2048 total pixels``.
    """
    written = text.strip()
    match = _PIXELS.fullmatch(written)
    if match is not None:
        width, height = int(match[1]), int(match[2])
        if width == 0 or height == 0:
            raise ValueError(f"{width}*{height}: width and height must be positive")
        pixels = width * height
        if not MIN_PIXELS <= pixels <= MAX_PIXELS:
            raise ValueError(f"{width}*{height} is outside 512*512..2048*2048 total pixels")
        return f"{width}*{height}"
    match = _RATIO.fullmatch(written)
    if match is not None:
        ratio = f"{int(match[1])}:{int(match[2])}"
        sizes = RECOMMENDED.get(ratio)
        if sizes is None:
            raise ValueError(
                f"{ratio} is not a recommended aspect ratio; use one of {_RATIOS}, or W*H"
            )
        tier = str(int(match[3])) if match[3] else DEFAULT_TIER
        if tier not in TIERS:
            raise ValueError(f"@{tier}: the pixel tier must be @1024, @1280 or @1536")
        return sizes[TIERS.index(tier)]
    shown = written if len(written) <= 40 else written[:40] + "..."
    raise ValueError(
        f"{shown!r} is not a size; write W*H (e.g. 1024*1536), WxH, or a ratio such as 16:9@1280"
    )
