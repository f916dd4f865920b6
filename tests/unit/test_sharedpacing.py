"""The shared pacer's decisions, pure: a cut once per overshoot from every worker's window,
slow start for all, and a simulation of several workers on one schedule against a
sliding-window quota (the schedule's SQL played in Python: no sockets, no sleeps)."""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Collection
from dataclasses import replace

import pytest

from batcher.pacing import (
    DEFAULT_QUOTA,
    MARGIN,
    PROBE_FIRST,
    PROBE_UP,
    RateController,
    head_start,
)
from batcher.sharedpacing import SHARED_MARGIN, on_accepted, on_throttled
from jobs.quota import QuotaState, Send


def row(rate: float, *, slow_start: bool = False, known_good: float | None = None) -> QuotaState:
    return QuotaState(
        next_at=0.0,
        interval_s=1.0 / rate,
        least_s=1e-3,
        slow_start=slow_start,
        known_good=1.0 / (known_good or rate),
        raised_at=0.0,
        cut_at=-math.inf,
        held_at=-math.inf,
        probe_at=math.inf,
        probe_every=PROBE_FIRST,
        ceiling=None,
        cuts=0,
    )


def grid(rate: float, start: float, end: float, throttled: Collection[int] = ()) -> list[Send]:
    n = int((end - start) * rate)
    return [Send(at=start + i / rate, throttled=i in throttled) for i in range(n + 1)]


def test_a_throttle_sets_the_rate_under_the_window_s_accepted_count_of_every_worker() -> None:
    # every worker's sends, 20/s, the last one throttled; a 429 held the schedule back lately
    state = replace(row(20.0), held_at=2.5)
    sends = grid(20.0, 0.0, 3.0)
    sends[-1] = replace(sends[-1], throttled=True)
    slot = sends[-1].at
    cut = on_throttled(state, sends, 3.01, slot=slot, quota=True, min_rate=0.05)
    assert cut is not None
    assert cut.ceiling == 20  # 20 accepted in the second before the throttled one
    assert cut.rate == pytest.approx(20 * 0.95)  # at most one STEP_DOWN per cut
    assert cut.cut_at == 3.01 and cut.cuts == 1 and cut.probe_at == 3.01 + PROBE_FIRST
    # the window is full until its oldest accepted send ages out
    assert cut.next_at >= sends[-21].at + 1.0
    # a send before the cut says nothing new; nor does a second one in the same window
    assert on_throttled(cut, sends, 3.02, slot=slot - 0.05, quota=True, min_rate=0.05) is None


def test_a_429_of_a_late_arrival_holds_the_schedule_back_without_a_cut() -> None:
    state = row(10 * SHARED_MARGIN)
    sends = grid(10 * SHARED_MARGIN, 0.0, 3.0)  # the rate is right: 10 accepted a second
    sends[-1] = replace(sends[-1], throttled=True)  # but one arrived late, bunched
    slot = sends[-1].at
    held = on_throttled(
        state, sends, 3.01, slot=slot, quota=True, min_rate=0.05, margin=SHARED_MARGIN
    )
    assert held is not None and held.rate == state.rate and held.cuts == 0
    assert held.next_at > slot and held.cut_at == held.held_at == 3.01
    # the bunch's other 429s are no news; another full window soon after is the rate's
    later = grid(10 * SHARED_MARGIN, 3.0, 5.0)
    later[-1] = replace(later[-1], throttled=True)
    cut = on_throttled(
        held, sends + later, 5.01, slot=later[-1].at, quota=True, min_rate=0.05,
        margin=SHARED_MARGIN,
    )  # fmt: skip
    assert cut is not None and cut.cuts == 1 and cut.rate < state.rate
    assert on_throttled(held, sends, 3.02, slot=slot - 0.1, quota=True, min_rate=0.05) is None


def test_told_twice_the_quota_one_cut_lands_just_under_it() -> None:
    state = row(20.0)
    # the service accepted 10 a second: half the sends of the last seconds were throttled
    sends = grid(20.0, 0.0, 2.0, throttled={i for i in range(41) if i % 2 == 0})
    cut = on_throttled(state, sends, 2.01, slot=sends[-1].at, quota=True, min_rate=0.05)
    assert cut is not None and cut.ceiling == 10
    assert cut.rate == pytest.approx(max(10 * MARGIN, 20 * 0.7))
    # with the shared margin, as the shared pacer passes it
    wide = on_throttled(
        state, sends, 2.01, slot=sends[-1].at, quota=True, min_rate=0.05, margin=SHARED_MARGIN
    )
    assert wide is not None and wide.rate == pytest.approx(max(10 * SHARED_MARGIN, 14.0))


def test_the_first_throttle_ends_slow_start_at_the_last_rate_fully_accepted_or_the_estimate() -> (
    None
):
    state = row(8.0, slow_start=True, known_good=4.0)
    sends = grid(8.0, 0.0, 1.5, throttled={4, 8, 12})  # 6 accepted in the last second
    cut = on_throttled(state, sends, 1.6, slot=sends[12].at, quota=True, min_rate=0.05)
    assert cut is not None and not cut.slow_start
    assert cut.ceiling == 6 and cut.rate == pytest.approx(6 * MARGIN)
    assert cut.probe_every >= 2 * PROBE_FIRST


def test_other_throttling_cuts_mildly_and_once_a_window() -> None:
    state = row(10.0)
    cut = on_throttled(state, [], 5.0, slot=4.9, quota=False, min_rate=0.05)
    assert cut is not None and cut.rate == pytest.approx(9.5)
    assert on_throttled(cut, [], 5.5, slot=5.2, quota=False, min_rate=0.05) is None


def test_slow_start_doubles_for_all_after_a_window_of_accepted_sends() -> None:
    state = replace(row(2.0, slow_start=True), raised_at=10.0)
    sends = grid(2.0, 10.0, 11.5)
    # an answer for a send before the raise proves nothing about the new rate
    assert on_accepted(state, sends, 12.0, slot=9.5, max_rate=10.0) is None
    # one send of the window accepted is not a window
    assert on_accepted(state, sends[:1], 12.0, slot=10.0, max_rate=10.0) is None
    up = on_accepted(state, sends, 12.0, slot=sends[-1].at, max_rate=10.0)
    assert up is not None and up.rate == pytest.approx(4.0) and up.slow_start
    assert up.known_good == pytest.approx(0.5) and up.raised_at == 12.0
    # a throttled send in the window: no raise
    marked = [replace(s, throttled=True) if i == 2 else s for i, s in enumerate(sends)]
    assert on_accepted(state, marked, 12.0, slot=sends[-1].at, max_rate=10.0) is None
    # never above the worker's own rate; slow start ends there
    top = on_accepted(replace(state, interval_s=1 / 8.0), grid(8.0, 10, 11.2), 12.0,
                      slot=11.2, max_rate=9.75)  # fmt: skip
    assert top is not None and top.rate == pytest.approx(9.75) and not top.slow_start
    # nor above the lowest rate any worker of the schedule was told
    low = on_accepted(replace(state, least_s=1 / 3.0), sends, 12.0, slot=sends[-1].at,
                      max_rate=10.0)  # fmt: skip
    assert low is not None and low.rate == pytest.approx(3.0) and not low.slow_start


def simulate(
    quota: int,
    stated: float,
    *,
    workers: int = 3,
    jobs: int = 600,
    latency: float = 0.5,
    jitter: float = 0.002,
    start_rate: float | None = None,
    known_good: float | None = None,
    seed: int = 1,
    whole: bool = False,
) -> tuple[int, int, float]:
    """``workers`` workers, each holding one reserved slot at a time and reserving the next as
    it sends, on one schedule (the row and the log as the SQL keeps them), against a server
    that accepts ``quota`` per sliding second. Returns (sends, throttled, accepted rate over
    the second half of the run, or over the whole run with ``whole``)."""
    rng = random.Random(seed)
    local = RateController(stated, now=0.0, start_rate=start_rate, known_good=known_good)
    scale = SHARED_MARGIN / MARGIN
    max_rate, least = local.max_rate * scale, 1.0 / (local.max_rate * scale)
    first = row(
        local.rate * scale, slow_start=local.slow_start, known_good=local.known_good * scale
    )
    state = replace(first, raised_at=0.0)
    log: dict[float, bool] = {}

    def reserve(now: float) -> float:  # the reservation's UPDATE, played in Python
        nonlocal state
        slot = max(state.next_at, now + 0.003)
        interval, probe_at = state.interval_s, state.probe_at
        if not state.slow_start and now >= state.probe_at:
            if interval > least:
                interval = max(least, interval / PROBE_UP)
            probe_at = now + state.probe_every
        state = replace(
            state,
            next_at=slot + max(state.interval_s, least),
            interval_s=interval,
            probe_at=probe_at,
        )
        log[slot] = False
        return slot

    def sends() -> list[Send]:
        return [Send(at=at, throttled=t) for at, t in sorted(log.items())]

    events: list[tuple[float, int, str, float]] = []
    order = 0
    for _ in range(workers):
        slot = reserve(0.0)
        heapq.heappush(events, (slot, order, "send", slot))
        order += 1
    window: list[float] = []
    accepted_at: list[float] = []
    total = throttled = 0
    while len(accepted_at) < jobs:
        now, _, kind, slot = heapq.heappop(events)
        if kind == "send":
            arrival = now + rng.uniform(0, jitter)
            window = [t for t in window if t > arrival - 1.0]
            total += 1
            if len(window) < quota:
                window.append(arrival)
                heapq.heappush(events, (now + latency, order, "ok", slot))
            else:
                throttled += 1
                heapq.heappush(events, (now + 0.001, order, "429", slot))
            order += 1
            nxt = reserve(now)
            heapq.heappush(events, (nxt, order, "send", nxt))
            order += 1
        elif kind == "ok":
            accepted_at.append(slot)
            state = on_accepted(state, sends(), now, slot=slot, max_rate=max_rate) or state
        else:
            log[slot] = True
            state = (
                on_throttled(
                    state, sends(), now, slot=slot, quota=True, min_rate=0.05, margin=SHARED_MARGIN
                )
                or state
            )
    half = sorted(accepted_at)[0 if whole else len(accepted_at) // 2 :]
    return total, throttled, (len(half) - 1) / (half[-1] - half[0])


def test_three_workers_told_the_quota_share_it_without_a_429() -> None:
    _, throttled, rate = simulate(10, 10.0, start_rate=None)
    assert throttled == 0
    assert rate == pytest.approx(10 * SHARED_MARGIN, rel=0.01)


def test_three_workers_in_slow_start_reach_the_quota_without_a_429() -> None:
    _, throttled, rate = simulate(10, 10.0, start_rate=2.0)
    assert throttled == 0
    assert rate >= 0.95 * 10


def test_three_workers_told_twice_the_quota_converge_under_it_with_few_429s() -> None:
    total, throttled, rate = simulate(10, 20.0, start_rate=None, jobs=1200)
    assert throttled / total <= 0.05, (throttled, total)
    assert 0.85 * 10 <= rate <= 10.0


def test_three_workers_told_the_quota_with_a_head_start_keep_near_it_from_the_start() -> None:
    """Over the whole of a 60 s run (as bench/workers_shared.py measures it), the head start
    at 8/s keeps the schedule near the stated quota where slow start from 2/s cannot."""
    start = head_start(10.0, DEFAULT_QUOTA, DEFAULT_QUOTA)
    _, throttled, head = simulate(
        10, 10.0, start_rate=start, known_good=DEFAULT_QUOTA, latency=1.0, whole=True
    )
    _, _, slow = simulate(10, 10.0, start_rate=DEFAULT_QUOTA, latency=1.0, whole=True)
    assert throttled == 0
    assert head >= 0.96 * 10 > slow


@pytest.mark.parametrize(("quota", "stated"), [(2, 10.0), (2, 1000.0), (5, 10.0)])
def test_three_workers_with_a_head_start_over_the_quota_fall_to_it_with_few_429s(
    quota: int, stated: float
) -> None:
    start = head_start(stated, DEFAULT_QUOTA, DEFAULT_QUOTA)
    total, throttled, rate = simulate(
        quota, stated, start_rate=start, known_good=DEFAULT_QUOTA, jobs=40 * quota
    )
    assert throttled <= 5, (throttled, total)
    assert 0.85 * quota <= rate <= quota
