"""Seeded per-request draws and the per-key sliding-window quota.

Reproducibility comes from deriving every random decision from ``(seed, stream, n)``: the n-th
generation request (stream ``"generate"``) and the n-th image download (stream ``"download"``)
get the same draws whatever the timing, the concurrency or the other streams did. A draw is a
BLAKE2b hash of those three values cut into numbers, so it is stable across Python versions too.

The quota counts only accepted requests: a request turned away with 429 does not use up the
window, as a client pacing itself at the quota would expect.

Pure: no I/O; the clock is passed in.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["Draw", "SlidingWindowQuota", "draw"]

_STANDARD_NORMAL = NormalDist()
_SCALE = float(1 << 56)
_SEED_MAX = 2_147_483_647


@dataclass(frozen=True, kw_only=True, slots=True)
class Draw:
    """The random numbers one request uses.

    ``fault_u`` is uniform in [0, 1) (picks the fault), ``latency_z`` standard normal (scales the
    latency), ``seed`` in [0, 2147483647] (the image seed when the request names none).
    """

    fault_u: float
    latency_z: float
    seed: int


def draw(base_seed: int, stream: str, n: int) -> Draw:
    """The draws of request number ``n`` of ``stream`` under ``base_seed``.

    >>> draw(7, "generate", 3) == draw(7, "generate", 3)
    True
    """
    digest = hashlib.blake2b(f"{base_seed}:{stream}:{n}".encode(), digest_size=18).digest()
    fault_u = int.from_bytes(digest[0:7], "big") / _SCALE
    # Centre the second number in its cell so it is never exactly 0 or 1.
    latency_u = (int.from_bytes(digest[7:14], "big") + 0.5) / _SCALE
    seed = int.from_bytes(digest[14:18], "big") & _SEED_MAX
    return Draw(fault_u=fault_u, latency_z=_STANDARD_NORMAL.inv_cdf(latency_u), seed=seed)


class SlidingWindowQuota:
    """At most ``capacity`` accepted requests per key in any sliding window of ``window`` seconds.

    For a whole ``rps`` that is ``rps`` per second. For a fractional one it is
    ``max(1, floor(rps))`` per ``capacity / rps`` seconds, so 0.5 allows one every 2 s and 2.5
    allows 2 in any 0.8 s. ``math.inf`` accepts everything.

    >>> q = SlidingWindowQuota(2)
    >>> [q.try_acquire("k", t) for t in (0.0, 0.1, 0.2, 1.05)]
    [True, True, False, True]
    """

    def __init__(self, rps: float) -> None:
        self._accepted: dict[str, deque[float]] = {}
        self.set_rate(rps)

    def set_rate(self, rps: float) -> None:
        """Change the rate; the requests already accepted stay in their windows."""
        if math.isnan(rps) or rps <= 0:
            raise ValueError(f"invalid rps {rps}: must be > 0")
        self._unlimited = math.isinf(rps)
        self.capacity = 0 if self._unlimited else max(1, math.floor(rps))
        self.window = 0.0 if self._unlimited else self.capacity / rps

    def try_acquire(self, key: str, now: float) -> bool:
        """Accept (and count) one request of ``key`` at time ``now``, or refuse it."""
        if self._unlimited:
            return True
        times = self._accepted.get(key)
        if times is None:
            times = self._accepted[key] = deque()
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) >= self.capacity:
            return False
        times.append(now)
        return True
