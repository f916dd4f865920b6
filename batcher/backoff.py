"""How long to wait before the next attempt: pure delay math.

No clock reads and no global randomness: the current time and a ``random.Random`` are
parameters, so a test (or a seeded soak) gets the same delays every time.

* :func:`full_jitter_delay` is AWS's "full jitter": a uniform draw between 0 and an
  exponentially growing, capped ceiling. It spreads retries of many workers apart.
* :func:`parse_retry_after` reads an HTTP ``Retry-After`` header (seconds or an HTTP-date).
* :func:`next_delay` combines them: a server's ``Retry-After`` is a floor, never shortened.

>>> import random
>>> rng = random.Random(7)
>>> 0.0 <= full_jitter_delay(3, rng=rng) <= 4.0
True
>>> next_delay(1, retry_after=12.0, rng=rng)
12.0
"""

from __future__ import annotations

import math
import random
import re
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["full_jitter_delay", "next_delay", "parse_retry_after"]

# 2.0**1023 is the largest power of two a float holds; beyond it the ceiling is the cap anyway.
_MAX_EXPONENT = 1023
# RFC 9110 delay-seconds is 1*DIGIT; a decimal fraction is accepted too (liberal in what we take).
# ASCII only: ``float`` would also take "1_0", " 1e3", "inf" and non-ASCII digits.
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


def _check_params(base: float, cap: float) -> None:
    if not (math.isfinite(base) and base > 0):
        raise ValueError(f"base must be a positive number of seconds, not {base!r}")
    if not (math.isfinite(cap) and cap >= 0):
        raise ValueError(f"cap must be a non-negative number of seconds, not {cap!r}")


def full_jitter_delay(
    attempt: int, *, base: float = 1.0, cap: float = 60.0, rng: random.Random
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first failure).

    Drawn uniformly from ``[0, min(cap, base * 2**(attempt - 1))]``.

    >>> full_jitter_delay(1, base=0.5, rng=random.Random(1)) <= 0.5
    True
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, not {attempt!r}")
    _check_params(base, cap)
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, *, now: float, max_delay: float = 300.0) -> float | None:
    """Read a ``Retry-After`` header value as seconds from ``now`` (a Unix timestamp).

    Accepts delay-seconds (``"120"``) or an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``).
    A date in the past gives ``0.0``; a value above ``max_delay`` is clamped to it. Anything
    unusable (missing, empty, garbage, negative, NaN) gives ``None``: fall back to backoff.

    >>> parse_retry_after("7", now=0.0)
    7.0
    >>> parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", now=30.0)
    30.0
    >>> parse_retry_after("soon", now=0.0) is None
    True
    """
    if not (math.isfinite(max_delay) and max_delay >= 0):
        raise ValueError(f"max_delay must be a non-negative number of seconds, not {max_delay!r}")
    if value is None or not value.strip():
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        seconds = float(text)  # finite: at most ~1e308 for any header a server could send
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" means UTC with no zone information (RFC 5322)
            when = when.replace(tzinfo=UTC)
        seconds = max(0.0, when.timestamp() - now)
    return min(seconds, max_delay) if math.isfinite(seconds) else max_delay


def next_delay(
    attempt: int,
    *,
    retry_after: float | None,
    rng: random.Random,
    base: float = 1.0,
    cap: float = 60.0,
) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt``.

    Without ``retry_after`` this is :func:`full_jitter_delay`. With it (as returned by
    :func:`parse_retry_after`) the wait is never shorter than the server asked for; the jitter
    still applies above it, so workers told the same thing do not all wake at once.
    The result lies in ``[retry_after or 0, max(cap, retry_after or 0)]``.

    >>> next_delay(2, retry_after=None, rng=random.Random(3)) <= 2.0
    True
    >>> next_delay(9, retry_after=90.0, rng=random.Random(3))
    90.0
    """
    jitter = full_jitter_delay(attempt, base=base, cap=cap, rng=rng)
    if retry_after is None:
        return jitter
    if not (math.isfinite(retry_after) and retry_after >= 0):
        raise ValueError(f"retry_after must be a non-negative number of seconds: {retry_after!r}")
    return max(retry_after, jitter)
