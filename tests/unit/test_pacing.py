"""The pacer's arithmetic, driven by a simulated sliding-window quota (no sockets, no sleeps)."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque

import pytest

from batcher.pacing import MARGIN, LatencyTracker, RateController, auto_concurrency


def simulate(quota: int, stated: float, jobs: int = 600, jitter: float = 0.002, seed: int = 1):
    """Send `jobs` accepted calls through a server that accepts at most `quota` per sliding
    second. Returns (sends, throttled, accepted rate)."""
    rng = random.Random(seed)
    rc = RateController(stated, now=0.0)
    window: deque[float] = deque()
    feedback: list[tuple[float, float]] = []  # (arrival of the 429, send time)
    t = accepted = throttled = sends = 0
    last = 0.0
    while accepted < jobs:
        while True:
            cuts = rc.cuts
            slot = rc.reserve(now=t)
            while feedback and feedback[0][0] <= slot:
                at, sent = heapq.heappop(feedback)
                rc.on_throttled(sent_at=sent, now=at)
                t = max(t, at)
            if rc.cuts == cuts:
                break
        t = slot
        arrival = t + rng.uniform(0, jitter)
        while window and window[0] <= arrival - 1.0:
            window.popleft()
        sends += 1
        if len(window) < quota:
            window.append(arrival)
            accepted += 1
            last = t
        else:
            throttled += 1
            heapq.heappush(feedback, (arrival + 0.003, t))
    return sends, throttled, accepted / last


def test_no_burst_at_start():
    rc = RateController(4.0, now=100.0)
    slots = [rc.reserve(now=100.0) for _ in range(4)]
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert slots[0] == 100.0
    assert all(g == pytest.approx(1 / (4 * MARGIN)) for g in gaps)


@pytest.mark.parametrize("quota", [2, 10, 50])
def test_told_the_right_quota_never_throttles_and_keeps_it_busy(quota):
    _sends, throttled, rate = simulate(quota, quota)
    assert throttled == 0
    assert rate >= 0.97 * quota


@pytest.mark.parametrize("quota", [2, 10, 50])
def test_told_twice_the_quota_converges_with_few_429s(quota):
    sends, throttled, rate = simulate(quota, 2 * quota)
    assert throttled / sends <= 0.05
    assert rate >= 0.9 * quota


def test_told_too_little_stays_under_what_it_was_told():
    _, throttled, rate = simulate(10, 5)
    assert throttled == 0
    assert rate <= 5.0


def test_a_429_for_a_call_sent_before_the_cut_is_ignored():
    rc = RateController(10.0, now=0.0)
    for _ in range(12):
        rc.reserve(now=0.0)
    assert rc.on_throttled(sent_at=1.0, now=1.01)
    rate = rc.rate
    assert not rc.on_throttled(sent_at=1.0, now=1.02)
    assert rc.rate == rate


def test_rate_never_exceeds_the_stated_rate_after_probing():
    rc = RateController(3.0, now=0.0)
    for i in range(40):
        rc.reserve(now=float(i))
    rc.on_throttled(sent_at=39.0, now=39.0)
    for i in range(40, 2000):
        rc.reserve(now=float(i))
    assert rc.rate <= 3.0 * MARGIN + 1e-9


def test_non_adaptive_ignores_throttling():
    rc = RateController(5.0, now=0.0, adaptive=False)
    rc.reserve(now=0.0)
    assert not rc.on_throttled(sent_at=0.0, now=0.1)
    assert rc.rate == pytest.approx(5 * MARGIN)


def test_rejects_a_non_positive_rate():
    with pytest.raises(ValueError):
        RateController(0.0, now=0.0)


def test_auto_concurrency_follows_rate_times_latency():
    lat = LatencyTracker(initial=1.0)
    low = auto_concurrency(2.0, lat)
    for _ in range(50):
        lat.add(4.0)
    high = auto_concurrency(2.0, lat)
    assert 4 <= low < high <= 512
    assert high >= 2.0 * 4.0  # enough to keep 2/s busy at 4 s each
    assert auto_concurrency(10_000.0, lat) == 512


def test_generic_throttling_cuts_mildly_and_at_most_once_a_second():
    rc = RateController(100.0, now=0.0)
    for _ in range(200):
        rc.reserve(now=0.0)
    before = rc.rate
    assert rc.on_throttled(sent_at=0.5, now=0.5, quota=False)
    assert rc.rate == pytest.approx(before * 0.95)
    assert not rc.on_throttled(sent_at=0.9, now=0.9, quota=False)  # within the same second
    for t in range(2, 12):  # a storm: one cut per second at most
        rc.on_throttled(sent_at=float(t), now=float(t), quota=False)
    assert rc.rate >= before * 0.95**11 * (1 - 1e-9)


def test_a_late_send_pushes_the_next_slot_back():
    rc = RateController(2.0, now=0.0)
    assert rc.reserve(now=0.0) == 0.0
    rc.sent(at=0.2)  # the event loop was busy: it left 200 ms late
    assert rc.wait_needed(now=0.2) == pytest.approx(1 / (2 * MARGIN))
    assert rc.reserve(now=0.2 + 1 / (2 * MARGIN)) == pytest.approx(0.2 + 1 / (2 * MARGIN))


def test_a_slightly_late_send_keeps_the_grid():
    rc = RateController(10.0, now=0.0)
    rc.reserve(now=0.0)
    rc.sent(at=0.001)  # 1 ms of wake-up lag is not lost
    assert rc.wait_needed(now=0.001) == pytest.approx(1 / (10 * MARGIN) - 0.001)


def test_a_caller_slightly_late_for_its_slot_keeps_the_grid():
    rc = RateController(10.0, now=0.0)
    gap = 1 / (10 * MARGIN)
    assert rc.reserve(now=0.0) == 0.0
    assert rc.reserve(now=gap + 0.001) == pytest.approx(gap)  # 1 ms late: the grid stands
    assert rc.reserve(now=2 * gap + 0.05) == pytest.approx(2 * gap + 0.05)  # 50 ms: re-anchored
