"""Counted nouns for what batcher prints: "1 job", "2 jobs", never "1 jobs".

One helper for every message, so a count and its noun always agree.

>>> plural(1, "job"), plural(2, "job"), plural(0, "retry", "retries")
('1 job', '2 jobs', '0 retries')
"""

from __future__ import annotations

__all__ = ["plural"]


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural unless the count is exactly one.

    ``many`` is the plural when it is not ``noun + "s"`` (``retry`` / ``retries``).
    """
    word = noun if count == 1 else (many if many is not None else noun + "s")
    return f"{count} {word}"
