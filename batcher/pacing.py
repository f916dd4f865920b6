"""Pacing: how fast to send, and how many calls to keep in flight.

The quota (2 requests/s for z-image-turbo) is counted by the service per account over a
sliding second, so the run decides its own speed rather than discovering it by 429s.

:class:`RateController` is pure arithmetic on a clock you pass in: a smooth limiter with no
burst at start (one slot every ``1/rate`` seconds), a small safety margin under the stated
rate, and an adaptive part: a throttled call cuts the rate (once per round trip: a 429 for a
request sent before the last cut says nothing new), then the rate recovers quickly to just
under the level where throttling began and probes above it slowly, never above the rate the
user stated. A user who states twice the real quota converges near it with few 429s; one who
states it right never sees the cut.

:class:`Pacer` turns those slots into ``await``\\ s. :func:`auto_concurrency` sizes the pool
from the rate and the observed latency (Little's law with head room), so the quota stays busy
when latency varies.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio

__all__ = ["LatencyTracker", "Pacer", "RateController", "auto_concurrency"]

MARGIN = 0.99  # send at 99% of the stated rate: ~10 ms of slack per second for jitter
CUT = 0.85  # multiplicative decrease on throttling
FAST_RECOVERY = 0.10  # per second, as a share of the ceiling, while well under it
SLOW_PROBE = 0.006  # per second, as a share of the ceiling, near and above it
RECOVER_TO = 0.97  # fast recovery ends at this share of the throttling ceiling


class RateController:
    """Decides when the next request may go out.

    >>> rc = RateController(2.0, now=0.0)
    >>> rc.reserve(now=0.0), rc.reserve(now=0.0)  # doctest: +ELLIPSIS
    (0.0, 0.50...)
    """

    def __init__(self, stated_rate: float, *, now: float, adaptive: bool = True) -> None:
        if not stated_rate > 0:
            raise ValueError("the rate must be positive")
        self.stated = stated_rate
        self.max_rate = stated_rate * MARGIN
        self.rate = self.max_rate
        self.adaptive = adaptive
        self.ceiling: float | None = None  # the rate at which throttling last began
        self.min_rate = min(self.max_rate, 0.05)
        self._next_slot = now
        self._last_cut = -math.inf
        self._last_update = now
        self.cuts = 0

    def _grow(self, now: float) -> None:
        dt = max(0.0, now - self._last_update)
        self._last_update = now
        if not self.adaptive or self.rate >= self.max_rate or dt == 0.0:
            return
        ceiling = self.ceiling or self.max_rate
        if self.rate < RECOVER_TO * ceiling:
            self.rate = min(RECOVER_TO * ceiling, self.rate + FAST_RECOVERY * ceiling * dt)
        else:
            self.rate += SLOW_PROBE * ceiling * dt
        self.rate = min(self.rate, self.max_rate)

    def reserve(self, *, now: float) -> float:
        """Reserve the next send slot; return the time it starts (``>= now``)."""
        self._grow(now)
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.rate
        return slot

    def on_throttled(self, *, sent_at: float, now: float) -> bool:
        """A call sent at ``sent_at`` was throttled. Returns True when the rate was cut."""
        if not self.adaptive or sent_at < self._last_cut:
            return False
        self._grow(now)
        self.ceiling = self.rate
        self.rate = max(self.min_rate, self.rate * CUT)
        self._last_cut = now
        self.cuts += 1
        # Requests already spaced for the old rate keep their slots; later ones use the new one.
        return True


class Pacer:
    """An awaitable front for :class:`RateController` on a monotonic clock."""

    def __init__(
        self, stated_rate: float, *, adaptive: bool = True, clock: Callable[[], float] | None = None
    ) -> None:
        self._clock = clock or anyio.current_time
        self.control = RateController(stated_rate, now=self._clock(), adaptive=adaptive)

    @property
    def rate(self) -> float:
        return self.control.rate

    async def wait_turn(self) -> float:
        """Wait for the next send slot; return the send time (for :meth:`throttled`)."""
        now = self._clock()
        slot = self.control.reserve(now=now)
        if slot > now:
            await anyio.sleep(slot - now)
        return self._clock()

    def throttled(self, sent_at: float) -> None:
        self.control.on_throttled(sent_at=sent_at, now=self._clock())


class LatencyTracker:
    """An exponentially weighted mean and a high quantile estimate of call latency."""

    def __init__(self, initial: float = 2.0, alpha: float = 0.1) -> None:
        self.mean = initial
        self.high = initial * 1.5
        self._alpha = alpha
        self.samples = 0

    def add(self, seconds: float) -> None:
        a = self._alpha if self.samples >= 10 else 1.0 / (self.samples + 1)
        self.samples += 1
        self.mean += a * (seconds - self.mean)
        # A cheap p95-ish tracker: jumps up fast, decays slowly.
        if seconds > self.high:
            self.high += 0.3 * (seconds - self.high)
        else:
            self.high += 0.02 * (seconds - self.high)


def auto_concurrency(
    rate: float, latency: LatencyTracker, *, floor: int = 4, cap: int = 512
) -> int:
    """Calls in flight needed to keep ``rate`` busy: rate x high latency x 1.5, plus slack."""
    need = rate * max(latency.high, latency.mean) * 1.5 + 2
    return max(floor, min(cap, math.ceil(need)))
