"""Pacing: how fast to send, and how many calls to keep in flight.

The quota (2 requests/s for z-image-turbo) is counted by the service per account over a
sliding second, so the run decides its own speed rather than discovering it by 429s.

:class:`RateController` is pure arithmetic on a clock you pass in: a smooth limiter with no
burst at start (one slot every ``1/rate`` seconds), a small safety margin under the stated
rate, a slow start, and an adaptive part: a throttled call (once per cut: a 429 for a request
sent before the last cut says nothing new) sets the rate just under the quota estimated from
the last second's accepted sends, and rare, backing-off probes look for more, never above
the rate the user stated. A user who states twice the real quota converges near it with few
429s; one who states it right never sees a cut.

:class:`Pacer` turns those slots into ``await``\\ s. :func:`auto_concurrency` sizes the pool
from the rate and the observed latency (Little's law with head room), so the quota stays busy
when latency varies.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio

__all__ = [
    "DEFAULT_QUOTA",
    "HEAD_START",
    "LatencyTracker",
    "Pacer",
    "Pacing",
    "RateController",
    "SlotSource",
    "auto_concurrency",
    "head_start",
]

MARGIN = 0.985  # send at 98.5% of the rate: ~15 ms of slack per window for arrival jitter
LATE = 0.005  # a send this late re-anchors the schedule (see RateController.sent)
STEP_DOWN = 0.95  # the least cut on throttling, when the window count says nothing better
FLOOR_STEP = 0.7  # the largest cut one throttle can make
PROBE_UP = 1.02  # each probe raises the rate by 2%
PROBE_FIRST = 5.0  # seconds without throttling before the first probe
PROBE_MAX = 120.0  # probing slows down (doubling) each time it meets the same ceiling
WINDOW = 1.0  # the service counts requests over a sliding second
JITTER = 0.02  # seconds of arrival jitter allowed for at the window's edge
DEFAULT_QUOTA = 2.0  # requests/s: the documented quota of z-image-turbo; where slow start begins
HEAD_START = 8.0  # requests/s: the most a quota the user stated is started at (see head_start)
SLOW_START_STEP = 2.0  # slow start doubles the rate after each window of accepted calls
PROVEN = 0.9  # share of a window's worth of calls at the rate that must be accepted to raise it


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
    (0.0, 0.508)
    """

    def __init__(
        self,
        stated_rate: float,
        *,
        now: float,
        adaptive: bool = True,
        start_rate: float | None = DEFAULT_QUOTA,
        known_good: float | None = None,
    ) -> None:
        if not (stated_rate > 0 and math.isfinite(stated_rate)):
            raise ValueError("the rate must be a positive number")
        if start_rate is not None and not start_rate > 0:
            raise ValueError("the start rate must be positive")
        if known_good is not None and not known_good > 0:
            raise ValueError("the known good rate must be positive")
        self.stated = stated_rate
        self.max_rate = stated_rate * MARGIN
        self.adaptive = adaptive
        start = stated_rate if start_rate is None or not adaptive else min(stated_rate, start_rate)
        self.rate = start * MARGIN
        # Slow start: the rate doubles after each window of accepted calls until a throttled
        # answer or the stated rate ends it. ``known_good`` is the last rate fully accepted:
        # the start, unless it is a head start (see head_start), which nothing has proven yet;
        # until a window proves it, a head start is slow start even at the stated rate (its
        # first 429 falls back to the window's estimate at once, not by bounded cuts).
        if known_good is not None and adaptive:
            self.known_good = min(self.rate, known_good * MARGIN)
        else:
            self.known_good = self.rate
        self.slow_start = self.rate < self.max_rate or self.known_good < self.rate
        self._raised_at = now
        self._accepted: list[float] = []  # send times of accepted calls since the last raise
        self._drain_until = -math.inf  # see _drained
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
            if slot < self._drain_until:
                self._next_slot = max(self._next_slot, self._drained(self._next_slot))
        return slot

    def _drained(self, slot: float) -> float:
        """The first time from ``slot`` on when the service's window has room for one more call.

        Leaving slow start, the window still holds the burst sent at the doubled rate: sending
        at the new rate at once would overfill it for most of a second (one 429 per send).
        """
        room = max(1, int(self.ceiling or 1))
        recent = self._accepted_in(slot - WINDOW * (2 - MARGIN), slot)
        if len(recent) < room:
            return slot
        return recent[len(recent) - room] + WINDOW * (2 - MARGIN)

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

    def _accepted_in(self, lo: float, hi: float) -> list[float]:
        """The send slots in ``(lo, hi]`` whose calls were not throttled.

        A throttled call is known by the time it was sent, which is its slot or a little
        after (the dispatcher's wake-up lag): each is matched to the latest slot at or before
        it, no further back than half a spacing, so the count is not off by the refused ones.
        """
        slots = [t for t in self._sends if lo < t <= hi + LATE]
        back = 0.5 / self.rate
        for refused in sorted(t for t in self._throttled if lo - back < t <= hi + LATE):
            at = bisect.bisect_right(slots, refused + 1e-9) - 1
            if at >= 0 and refused - slots[at] <= back:
                del slots[at]
        return [t for t in slots if t <= hi]

    def on_accepted(self, *, sent_at: float, now: float) -> bool:
        """The service answered a call sent at ``sent_at`` without throttling it.

        In slow start, once calls sent at the current rate filled a window (``PROVEN`` of the
        calls the rate allows in it, all accepted), the rate doubles, up to the stated rate.
        Returns True when the rate was raised. Calls sent before the last raise prove nothing
        about the new rate and are not counted; nor are calls the pool could not send at the
        rate (a pool held back by latency never raises a rate it did not try).
        """
        if not self.slow_start or sent_at < self._raised_at:
            return False
        bisect.insort(self._accepted, sent_at)
        newest = self._accepted[-1]
        first = bisect.bisect_right(self._accepted, newest - WINDOW)
        del self._accepted[:first]
        if len(self._accepted) < max(2, math.ceil(PROVEN * self.rate * WINDOW)):
            return False
        self.known_good = self.rate
        self.rate = min(self.max_rate, self.rate * SLOW_START_STEP)
        self.slow_start = self.rate < self.max_rate
        self._raised_at = now
        self._accepted.clear()
        return True

    def _end_slow_start(self, estimate: float | None) -> None:
        """The first throttled answer ends slow start: back to the last rate fully accepted,
        or to the window's estimate of the quota when that is higher (and below the rate)."""
        self.slow_start = False
        self._drain_until = self._last_slot + 2 * WINDOW
        target = self.known_good
        if estimate is not None:
            target = max(target, min(estimate * MARGIN, self.rate * STEP_DOWN))
        self.rate = max(self.min_rate, min(self.rate, target))

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
            if self.slow_start:
                self._end_slow_start(None)
            else:
                self.rate = max(self.min_rate, self.rate * STEP_DOWN)
            self._last_cut = now
            self._probe_at = now + self._probe_every
            self.cuts += 1
            return True
        # A little slack: a send right at the window's edge arrived inside it as far as the
        # service could tell (arrival jitter), so count it. A quarter of a spacing, but never
        # more than JITTER: at a low rate a quarter spacing would reach back to a send the
        # service's window no longer held, and overestimate a 2/s quota by half.
        lo = sent_at - WINDOW - min(0.25 / self.rate, JITTER)
        accepted = self._accepted_in(lo, sent_at)
        estimate = float(max(1, len(accepted)))
        if accepted:
            # The window is full until its oldest accepted call ages out: wait for that
            # instead of sending into it (each such send would be one more 429).
            self._next_slot = max(self._next_slot, accepted[0] + WINDOW * (2 - MARGIN))
        same = self.ceiling is not None and abs(estimate - self.ceiling) < 0.5
        if same:
            self._probe_every = min(PROBE_MAX, self._probe_every * 2)  # same ceiling again
        else:
            self._probe_every = PROBE_FIRST
        self.ceiling = estimate
        if self.slow_start:
            self._end_slow_start(estimate)
            self._next_slot = max(self._next_slot, self._drained(self._next_slot))
            # The doubling that overshot brackets the quota (between the rate fully accepted
            # and twice it): the first probe above it can wait longer.
            self._probe_every = max(self._probe_every, 2 * PROBE_FIRST)
        else:
            # One throttle lowers the rate by a bounded step: a thin count (a quiet second, a
            # boundary case) must not halve a run's speed.
            target = min(self.rate * STEP_DOWN, max(estimate * MARGIN, self.rate * FLOOR_STEP))
            if same and self.rate > estimate * MARGIN * PROBE_UP**0.5:
                # A probe met the ceiling found before: back to just under it, the rate that
                # held until the probe, not a further 5% below.
                target = estimate * MARGIN
            self.rate = max(self.min_rate, target)
        self._last_cut = now
        self._probe_at = now + self._probe_every
        self.cuts += 1  # a slot reserved before this cut is void: see Pacer.wait_turn
        return True


def head_start(rate: float, published: float, start: float | None) -> float | None:
    """Where slow start begins for a pacer of ``rate`` requests/s, the model's published quota
    being ``published`` and the run's start ``start`` (None: no slow start).

    A rate above the published quota was stated by the user (``--rps``, a lane's ``quota``):
    the account's raised quota. Doubling from the published quota up to it would cost a short
    run several seconds at a fraction of the rate (each doubling waits for a window of
    answers), so such a pacer starts at the stated rate, up to ``HEAD_START``. A statement that
    is wrong costs only the calls sent before the first 429 comes back (it comes back at once):
    the head start is not proven (``known_good`` stays at ``start``), so that 429 ends slow
    start at the window's estimate of the quota, as a doubling that overshot would. The cap
    keeps that handful small whatever is stated: ``--rps 1000`` against a 2/s quota starts at
    8/s, not 1000/s.

    >>> head_start(10.0, 2.0, 2.0), head_start(1000.0, 2.0, 2.0), head_start(2.0, 2.0, 2.0)
    (8.0, 8.0, 2.0)
    >>> head_start(5.0, 5.0, 2.0), head_start(10.0, 2.0, None)
    (2.0, None)
    """
    if start is None or rate <= published:
        return start
    return max(start, min(rate, HEAD_START))


class SlotSource(Protocol):
    """What the dispatcher asks of a pacer's schedule, synchronously: when the next slot is
    due, take it, and when its call went out."""

    def wait_needed(self, *, now: float) -> float: ...

    def reserve(self, *, now: float) -> float: ...

    def sent(self, *, at: float) -> None: ...


class Pacing(Protocol):
    """A model's pacer as the pool uses it: :class:`Pacer` (one process pacing itself) or
    ``batcher.sharedpacing.SharedPacer`` (workers sharing a schedule in PostgreSQL)."""

    @property
    def control(self) -> SlotSource: ...

    @property
    def rate(self) -> float: ...

    def accepted(self, sent_at: float) -> None: ...

    def throttled(self, sent_at: float, *, quota: bool = True) -> None: ...


class Pacer:
    """An awaitable front for :class:`RateController` on a monotonic clock."""

    def __init__(
        self,
        stated_rate: float,
        *,
        adaptive: bool = True,
        start_rate: float | None = DEFAULT_QUOTA,
        known_good: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock or anyio.current_time
        self.control = RateController(
            stated_rate,
            now=self._clock(),
            adaptive=adaptive,
            start_rate=start_rate,
            known_good=known_good,
        )

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

    def accepted(self, sent_at: float) -> None:
        """The service answered a call sent at ``sent_at`` without throttling it."""
        self.control.on_accepted(sent_at=sent_at, now=self._clock())


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
