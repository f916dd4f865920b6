"""Pacing: how fast to send, and how many calls to keep in flight.

The quota (2 requests/s for z-image-turbo) is counted by the service per account over a
sliding second, so the run decides its own speed rather than discovering it by 429s.

:class:`RateController` is pure arithmetic on a clock you pass in: a smooth limiter with no
burst at start (one slot every ``1/rate`` seconds), a small safety margin under the stated
rate, and an adaptive part: a throttled call (once per cut: a 429 for a request sent before
the last cut says nothing new) sets the rate just under the quota estimated from the last
second's accepted sends, and rare, backing-off probes look for more, never above the rate the
user stated. A user who states twice the real quota converges near it with few 429s; one who
states it right never sees a cut.

:class:`Pacer` turns those slots into ``await``\\ s. :func:`auto_concurrency` sizes the pool
from the rate and the observed latency (Little's law with head room), so the quota stays busy
when latency varies.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import anyio

__all__ = ["LatencyTracker", "Pacer", "RateController", "auto_concurrency"]

MARGIN = 0.985  # send at 98.5% of the rate: ~15 ms of slack per window for arrival jitter
LATE = 0.005  # a send this late re-anchors the schedule (see RateController.sent)
STEP_DOWN = 0.95  # the least cut on throttling, when the window count says nothing better
FLOOR_STEP = 0.7  # the largest cut one throttle can make
PROBE_UP = 1.02  # each probe raises the rate by 2%
PROBE_FIRST = 5.0  # seconds without throttling before the first probe
PROBE_MAX = 120.0  # probing slows down (doubling) each time it meets the same ceiling
WINDOW = 1.0  # the service counts requests over a sliding second


class RateController:
    """Decides when the next request may go out.

    A throttled call tells more than "too fast": the service counts *accepted* requests per
    sliding second, and 429s come back at once, so the sends in the second before the
    throttled one, less those throttled, estimate the quota (our share of it, when another
    process shares the account). The rate drops to just under that estimate in one step.
    Above the estimate lies a cliff: a sliding-window limiter rejects one call in ``Q + 1``
    as soon as the rate passes ``Q`` at all, so probing is rare, 2% at a time, and backs off
    (5 s, 10 s, ... 120 s) each time it finds the same ceiling again.

    >>> rc = RateController(2.0, now=0.0)
    >>> rc.reserve(now=0.0), round(rc.reserve(now=0.0), 3)
    (0.0, 0.505)
    """

    def __init__(self, stated_rate: float, *, now: float, adaptive: bool = True) -> None:
        if not stated_rate > 0:
            raise ValueError("the rate must be positive")
        self.stated = stated_rate
        self.max_rate = stated_rate * MARGIN
        self.rate = self.max_rate
        self.adaptive = adaptive
        self.ceiling: float | None = None  # the last quota estimate
        self.min_rate = min(self.max_rate, 0.05)
        self._next_slot = now
        self._last_slot = now
        self._last_cut = -math.inf
        self._probe_at = math.inf
        self._probe_every = PROBE_FIRST
        self._sends: deque[float] = deque()
        self._throttled: deque[float] = deque()
        self.cuts = 0

    def _trim(self, now: float) -> None:
        horizon = now - 4 * WINDOW
        while self._sends and self._sends[0] < horizon:
            self._sends.popleft()
        while self._throttled and self._throttled[0] < horizon:
            self._throttled.popleft()

    def reserve(self, *, now: float) -> float:
        """Reserve the next send slot; return the time it starts (``>= now``)."""
        if self.adaptive and now >= self._probe_at and self.rate < self.max_rate:
            self.rate = min(self.max_rate, self.rate * PROBE_UP)
            self._probe_at = now + self._probe_every
        # A caller a little late for its slot keeps to the grid (the lag is within the
        # margin's slack); one late by more than LATE starts the grid again from now.
        slot = self._next_slot if now - self._next_slot <= LATE else now
        slot = max(slot, self._next_slot)
        self._next_slot = slot + 1.0 / self.rate
        self._last_slot = slot
        if self.adaptive:
            self._sends.append(slot)
            self._trim(slot)
        return slot

    def wait_needed(self, *, now: float) -> float:
        """Seconds until the next slot is free (0 when a send may go now)."""
        return max(0.0, self._next_slot - now)

    def sent(self, *, at: float) -> None:
        """A request actually went out at ``at``.

        Sends keep to a fixed grid: a send a little late (the usual wake-up lag, well under
        the margin's slack) changes nothing, or the lag would be lost on every interval. A
        send late by more than ``LATE`` (a busy event loop) re-anchors the grid on it, so it
        cannot bunch up with the sends after it and overfill the service's window.
        """
        if at - self._last_slot > LATE:
            self._next_slot = max(self._next_slot, at + 1.0 / self.rate)

    def on_throttled(self, *, sent_at: float, now: float, quota: bool = True) -> bool:
        """A call sent at ``sent_at`` was throttled. Returns True when the rate was cut.

        ``quota`` says the 429 named the request-rate quota (``Throttling.RateQuota``): the
        window count then estimates it. Other throttling (generic ``Throttling``, burst or
        capacity) says less: a mild cut, at most one per window, so a storm of them slows
        the run without collapsing it.
        """
        if not self.adaptive:
            return False
        self._throttled.append(sent_at)
        if sent_at < self._last_cut:
            return False  # sent at the old rate: already acted on
        if not quota:
            if now - self._last_cut < WINDOW:
                return False
            self.rate = max(self.min_rate, self.rate * STEP_DOWN)
            self._last_cut = now
            self._probe_at = now + self._probe_every
            self.cuts += 1
            return True
        # A quarter of a spacing of slack: a send right at the window's edge arrived inside
        # it as far as the service could tell (arrival jitter), so count it.
        lo = sent_at - WINDOW - 0.25 / self.rate
        refused = {t for t in self._throttled if lo < t <= sent_at}
        accepted = [t for t in self._sends if lo < t <= sent_at and t not in refused]
        estimate = float(max(1, len(accepted)))
        if accepted:
            # The window is full until its oldest accepted call ages out: wait for that
            # instead of sending into it (each such send would be one more 429).
            self._next_slot = max(self._next_slot, accepted[0] + WINDOW * (2 - MARGIN))
        if self.ceiling is not None and abs(estimate - self.ceiling) < 0.5:
            self._probe_every = min(PROBE_MAX, self._probe_every * 2)  # same ceiling again
        else:
            self._probe_every = PROBE_FIRST
        self.ceiling = estimate
        # One throttle lowers the rate by a bounded step: a thin count (a quiet second, a
        # boundary case) must not halve a run's speed.
        target = min(self.rate * STEP_DOWN, max(estimate * MARGIN, self.rate * FLOOR_STEP))
        self.rate = max(self.min_rate, target)
        self._last_cut = now
        self._probe_at = now + self._probe_every
        self.cuts += 1  # a slot reserved before this cut is void: see Pacer.wait_turn
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
        """Wait for the next send slot; return the send time (for :meth:`throttled`).

        A cut while waiting voids the slot (it was spaced for the old rate): reserve again.
        """
        while True:
            cuts = self.control.cuts
            now = self._clock()
            slot = self.control.reserve(now=now)
            if slot > now:
                await anyio.sleep(slot - now)
            if self.control.cuts == cuts:
                return self._clock()

    def throttled(self, sent_at: float, *, quota: bool = True) -> None:
        self.control.on_throttled(sent_at=sent_at, now=self._clock(), quota=quota)


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
