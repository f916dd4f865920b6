"""Pacing shared by several workers of one PostgreSQL run: one schedule per (lane, model).

Each ``batcher run`` process paces itself (:mod:`batcher.pacing`), so N processes on one
account would send N times its quota. When the run's table is in PostgreSQL, each model's pacer
is a :class:`SharedPacer` instead: its send slots come from the schedule row all workers share
(:mod:`jobs.quota`), reserved one at a time in the database, on the server's clock.

The dispatcher's calls stay synchronous and cheap: :meth:`SharedPacer.wait_needed` and
:meth:`SharedPacer.reserve` read the slot this worker holds, and a background task
(:meth:`SharedPacer.serve`) reserves the next one when the dispatcher asks for it (lazily: a
worker with nothing to send holds no slot, so it takes none from the others). The slot's
server time becomes a local monotonic one through an offset measured at every round trip
(the sample of the fastest recent round trip, whose midpoint is known best). A slot the
dispatcher reaches more than ``LATE_USE`` after its time is given back, never sent that late
(a stalled host). The shared schedule keeps a wider margin under the stated rate than a single
process (``SHARED_MARGIN``), so that a send up to ``LATE_SHARED`` late (a busy host) still fits
the service's window. A send later than that would overfill the window that ends at the slot
one quota's worth of sends after it (the service counts a sliding second: sending late moves a
call towards the calls after it); those slots are not handed out yet, so the schedule moves
every slot from its next free one on by the send's lateness past the slack, and the late slot
is used. (Giving it back instead, as this pacer did, left a whole spacing unused for every
slot a busy host reached 20 ms late: 1.5-5% of the slots of three workers on a loaded 2-core
machine. A single process re-anchors its grid on a late send, see
:meth:`batcher.pacing.RateController.sent`.)

The adaptive part is :class:`batcher.pacing.RateController`'s, acting on the shared row:
:func:`on_throttled` and :func:`on_accepted` are its rules as pure functions of the row and
the sends every worker logged in the last seconds, run by :meth:`jobs.quota.QuotaSchedule.adapt`
under the row's lock. So a throttled worker lowers the rate for all (once per cut: a 429 for
a send before the last cut says nothing new), slow start doubles the rate of all, and probes
raise it for all, never above the rate this worker was told. One rule differs: a 429 from a
window no fuller than the rate makes it (one send arrived late, bunched with the next: with
several processes on busy hosts that happens) first only holds the schedule back; a second
such 429 within ``HOLD`` seconds cuts, as the rate is then over the quota.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import anyio

from jobs.errors import StoreUnavailable
from jobs.quota import QuotaSchedule, QuotaState, Send

from .pacing import (
    DEFAULT_QUOTA,
    FLOOR_STEP,
    JITTER,
    MARGIN,
    PROBE_FIRST,
    PROBE_MAX,
    PROBE_UP,
    PROVEN,
    SLOW_START_STEP,
    STEP_DOWN,
    WINDOW,
    RateController,
)

__all__ = ["SharedPacer", "on_accepted", "on_throttled"]

log = logging.getLogger("batcher.run")

SHARED_MARGIN = 0.975  # of the stated rate: ~25 ms of slack per window (see LATE_SHARED)
LATE_SHARED = 0.020  # s: how late a send may go out and keep the grid (~25 ms of slack)
LATE_USE = 0.100  # s: how late a slot may still be used (the grid after it moves: see sent)
ASKING = 0.05  # s: what wait_needed says while a reservation is on its way (it wakes us)
LEAD_MAX = 0.05  # s: the most a slot is reserved ahead of the server's now
RETRY = 1.0  # s: between attempts when the database cannot be reached
HOLD = 2 * PROBE_FIRST  # s: a second 429 of a full window within this is the rate's
SAMPLES = 32  # round trips the clock offset is chosen from
FORGOTTEN = 5.0  # s: a handed slot whose call has not gone out by then never will
REMEMBERED = 4096  # sends whose slot is remembered for their answer


def on_throttled(
    state: QuotaState,
    sends: list[Send],
    now: float,
    *,
    slot: float,
    quota: bool,
    min_rate: float,
    margin: float = MARGIN,
) -> QuotaState | None:
    """The row after a call sent at ``slot`` was throttled (None: nothing to change).

    :meth:`RateController.on_throttled` on the shared row: ``sends`` is every worker's log,
    with the throttled ones marked, so the window's accepted sends estimate the account's
    quota, not this worker's share of it.
    """
    if slot < state.cut_at:
        return None  # sent at the old rate: already acted on
    rate = state.rate
    if not quota:
        if now - state.cut_at < WINDOW:
            return None
        if state.slow_start:
            rate = max(min_rate, min(rate, 1.0 / state.known_good))
        else:
            rate = max(min_rate, rate * STEP_DOWN)
        return replace(
            state,
            interval_s=1.0 / rate,
            slow_start=False,
            cut_at=now,
            probe_at=now + state.probe_every,
            cuts=state.cuts + 1,
        )
    lo = slot - WINDOW - min(0.25 / rate, JITTER)
    accepted = [s.at for s in sends if lo < s.at <= slot and not s.throttled]
    estimate = float(max(1, len(accepted)))
    next_at = state.next_at
    if accepted:
        # the window is full until its oldest accepted send ages out
        next_at = max(next_at, accepted[0] + WINDOW * (2 - MARGIN))
    if (
        not state.slow_start
        and len(accepted) >= math.ceil(rate * WINDOW) - 1
        and now - state.held_at > HOLD
    ):
        # The window was as full as the rate makes it, every send accepted: either the rate
        # is a little over the quota, or it is right and a busy host sent one late, bunched
        # with the next (the window's count cannot tell). The first time, hold the schedule
        # back until the window has room and keep the rate: cutting every worker's rate for
        # one late arrival costs far more than the 429 did. A second such 429 within HOLD
        # seconds is the rate's: it is cut as usual.
        return replace(state, next_at=next_at, cut_at=now, held_at=now)
    same = state.ceiling is not None and abs(estimate - state.ceiling) < 0.5
    probe_every = min(PROBE_MAX, state.probe_every * 2) if same else PROBE_FIRST
    if state.slow_start:
        target = max(1.0 / state.known_good, min(estimate * margin, rate * STEP_DOWN))
        rate = max(min_rate, min(rate, target))
        # leaving slow start, the window still holds the burst sent at the doubled rate
        room = max(1, int(estimate))
        span = WINDOW * (2 - MARGIN)
        recent = [s.at for s in sends if next_at - span < s.at <= next_at and not s.throttled]
        if len(recent) >= room:
            next_at = max(next_at, recent[len(recent) - room] + span)
        probe_every = max(probe_every, 2 * PROBE_FIRST)
    else:
        target = min(rate * STEP_DOWN, max(estimate * margin, rate * FLOOR_STEP))
        if same and rate > estimate * margin * PROBE_UP**0.5:
            target = estimate * margin  # a probe met the ceiling found before
        rate = max(min_rate, target)
    return replace(
        state,
        next_at=next_at,
        interval_s=1.0 / rate,
        slow_start=False,
        ceiling=estimate,
        cut_at=now,
        probe_at=now + probe_every,
        probe_every=probe_every,
        cuts=state.cuts + 1,
    )


def on_accepted(
    state: QuotaState, sends: list[Send], now: float, *, slot: float, max_rate: float
) -> QuotaState | None:
    """The row after a call sent at ``slot`` was accepted (None: nothing to change).

    :meth:`RateController.on_accepted` on the shared row: in slow start, once the sends of one
    window at the current rate (every worker's, since the last raise) were accepted, the rate
    doubles, up to ``max_rate``.
    """
    if not state.slow_start or slot < state.raised_at:
        return None
    max_rate = min(max_rate, 1.0 / state.least_s)
    window = [s for s in sends if s.at >= state.raised_at and slot - WINDOW < s.at <= slot]
    if any(s.throttled for s in window):
        return None
    if len(window) < max(2, math.ceil(PROVEN * state.rate * WINDOW)):
        return None
    rate = min(max_rate, state.rate * SLOW_START_STEP)
    return replace(
        state,
        known_good=state.interval_s,
        interval_s=1.0 / rate,
        slow_start=rate < max_rate,
        raised_at=now,
    )


class SharedPacer:
    """A pacer whose slots come from the schedule every worker shares (see the module
    docstring). It is also its own ``control``: the dispatcher's ``wait_needed``, ``reserve``
    and ``sent`` are answered here, from the slot in hand.

    ``on_slot`` is called when a reserved slot arrives (the dispatcher's wake-up).
    """

    def __init__(
        self,
        schedule: QuotaSchedule,
        stated_rate: float,
        *,
        adaptive: bool = True,
        start_rate: float | None = DEFAULT_QUOTA,
        known_good: float | None = None,
        on_slot: Callable[[], None] = lambda: None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.schedule = schedule
        self._clock = clock or anyio.current_time
        local = RateController(
            stated_rate, now=0.0, adaptive=adaptive, start_rate=start_rate, known_good=known_good
        )
        self.adaptive = adaptive
        scale = SHARED_MARGIN / MARGIN
        self.max_rate = local.max_rate * scale
        self.min_rate = local.min_rate
        self._start_rate = local.rate * scale  # the row a first worker makes
        self._start_slow = local.slow_start
        self._known_good = local.known_good * scale
        self._state: QuotaState | None = None
        self._on_slot = on_slot
        self.control = self
        self._slot: tuple[float, float] | None = None  # (local time, server time)
        self._asking = False
        self._handed: deque[tuple[float, float]] = deque()  # reserved, not yet sent
        self._sent: OrderedDict[float, float] = OrderedDict()  # local send time -> slot
        self._throttled: list[tuple[float, bool]] = []
        self._raise_at: float | None = None  # the latest accepted slot to check for a raise
        self._late: list[tuple[float, float]] = []  # (server send time, lateness past slack)
        self._unused: list[float] = []
        self._kick = anyio.Event()
        self._offsets: deque[tuple[float, float]] = deque(maxlen=SAMPLES)  # (rtt, offset)
        self._failing = False  # the database failed and has not answered since
        self.given_back = 0  # slots reached too late to use
        self.late = 0  # sends that went out late (the schedule was pushed after them)
        self.reserved = 0

    # ------------------------------------------------------------- the dispatcher's side

    @property
    def rate(self) -> float:
        """The rate every worker of the schedule keeps to together."""
        if self._state is None:
            return self._start_rate
        return min(self.max_rate, self._state.rate)

    @property
    def offset(self) -> float:
        """Server clock minus the local monotonic clock (of the fastest recent round trip)."""
        return min(self._offsets)[1] if self._offsets else 0.0

    def wait_needed(self, *, now: float) -> float:
        """Seconds until the slot in hand is due; while none is, ask for one."""
        if self._slot is not None:
            local, server = self._slot
            if now - local <= LATE_USE:
                return max(0.0, local - now)
            self._slot = None  # too late to send on it without crowding the next one
            self._unused.append(server)
            self.given_back += 1
        if not self._asking:
            self._asking = True
            self._kick.set()
        return ASKING

    def reserve(self, *, now: float) -> float:
        """Take the slot in hand (the dispatcher saw ``wait_needed`` at 0 just before)."""
        if self._slot is None:
            raise RuntimeError("no send slot in hand: call wait_needed first")
        local, server = self._slot
        self._slot = None
        self._handed.append((local, server))
        return local

    def sent(self, *, at: float) -> None:
        """The call of the oldest handed slot went out at ``at`` (local monotonic)."""
        while len(self._handed) > 1 and self._handed[0][0] < at - FORGOTTEN:
            self._handed.popleft()  # a call that never went out (its job was lost before)
        if not self._handed:
            return
        local, server = self._handed.popleft()
        self._sent[at] = server
        while len(self._sent) > REMEMBERED:
            self._sent.popitem(last=False)
        if at - local > LATE_SHARED:  # a busy event loop: the next slots must not crowd it
            self.late += 1
            self._late.append((at + self.offset, at - local - LATE_SHARED))
            self._kick.set()

    def accepted(self, sent_at: float) -> None:
        """The service accepted the call sent at ``sent_at``."""
        slot = self._sent.pop(sent_at, None)
        state = self._state
        if slot is None or not self.adaptive or state is None or not state.slow_start:
            return
        if slot >= state.raised_at:
            self._raise_at = max(self._raise_at or slot, slot)
            self._kick.set()

    def throttled(self, sent_at: float, *, quota: bool = True) -> None:
        """The service throttled the call sent at ``sent_at``."""
        slot = self._sent.pop(sent_at, None)
        if slot is None:
            slot = sent_at + self.offset
        self._throttled.append((slot, quota))
        self._kick.set()

    # --------------------------------------------------------------- the database side

    async def serve(self) -> None:
        """Join the schedule, then carry out what the dispatcher asked for, until cancelled.

        A database that cannot be reached holds the slots back (nothing is sent without one)
        and is tried again every second."""
        try:
            while True:
                try:
                    if self._state is None:
                        await self._join()
                    await self._work()
                    continue
                except StoreUnavailable as exc:
                    # once per outage (a slot reserved again ends it): the run's own outage
                    # handling says the rest
                    level = logging.DEBUG if self._failing else logging.WARNING
                    log.log(level, "the shared send schedule of %s: %s", self.schedule.model, exc)
                    self._failing = True
                await anyio.sleep(RETRY)
                # What was asked for before the failure (a slot, a cut, a push) is asked again:
                # the dispatcher asks once and then waits for the slot.
                self._kick.set()
        finally:
            log.info(
                "shared send schedule of %s on lane %s: %d slots reserved, %d given back "
                "(reached too late), %d sent late, %.2f/s at the end",
                self.schedule.model,
                self.schedule.lane,
                self.reserved,
                self.given_back,
                self.late,
                self.rate,
            )

    async def _work(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            await self._adapt()
            if self._late:
                after = max(at for at, _ in self._late)
                shift = sum(by for _, by in self._late)
                self._late.clear()
                await self.schedule.push(after=after, shift=shift)
            if self._asking and self._slot is None:
                await self._reserve()
            if self._unused:
                slot = self._unused.pop()
                await self.schedule.forget(slot)
                if self._unused:
                    self._kick.set()

    async def _join(self) -> None:
        before = self._clock()
        server, state = await self.schedule.join(
            interval_s=1.0 / self._start_rate,
            least_s=1.0 / self.max_rate,
            slow_start=self._start_slow,
            probe_every=PROBE_FIRST,
            known_good_s=1.0 / self._known_good,
        )
        self._sample(before, server)
        self._state = state

    async def _reserve(self) -> None:
        before = self._clock()
        got = await self.schedule.reserve(
            min_interval=1.0 / self.max_rate, lead=self._lead(), probe_up=PROBE_UP
        )
        self._sample(before, got.server_now)
        self._state = got.state
        self._slot = (got.slot - self.offset, got.slot)
        self._asking = False
        self.reserved += 1
        self._on_slot()

    async def _adapt(self) -> None:
        if not self.adaptive:
            self._throttled.clear()
            self._raise_at = None
            return
        while self._throttled:
            slot, quota = self._throttled[0]  # taken off once written: a failure keeps it
            decide = partial(
                on_throttled, slot=slot, quota=quota, min_rate=self.min_rate, margin=SHARED_MARGIN
            )
            self._state = await self.schedule.adapt(decide, throttled_at=slot)
            self._throttled.pop(0)
        if self._raise_at is not None:
            slot, self._raise_at = self._raise_at, None
            decide_up = partial(on_accepted, slot=slot, max_rate=self.max_rate)
            self._state = await self.schedule.adapt(decide_up)

    def _sample(self, before: float, server: float) -> None:
        self._failing = False
        after = self._clock()
        self._offsets.append((after - before, server - (before + after) / 2))

    def _lead(self) -> float:
        """How far ahead of the server's now a slot must be to arrive here before it is due."""
        rtt = min(self._offsets)[0] if self._offsets else LEAD_MAX
        return min(LEAD_MAX, max(0.003, 2 * rtt))
