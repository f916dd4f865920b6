"""The pacer's arithmetic, driven by a simulated sliding-window quota (no sockets, no sleeps)."""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque

import pytest

from batcher.pacing import (
    DEFAULT_QUOTA,
    HEAD_START,
    MARGIN,
    LatencyTracker,
    RateController,
    auto_concurrency,
    head_start,
)


def simulate(
    quota: int,
    stated: float,
    jobs: int = 600,
    jitter: float = 0.002,
    seed: int = 1,
    latency: float = 0.5,
    start_rate: float | None = None,
    known_good: float | None = None,
):
    """Send `jobs` accepted calls through a server that accepts at most `quota` per sliding
    second, answering accepted calls after `latency` s and throttled ones at once. Returns
    (sends, throttled, accepted rate, the sends in order with True for each throttled one,
    accepted rate over the second half of the run). ``start_rate`` None: the run starts at
    the stated rate (no slow start); otherwise the controller's slow start from it."""
    rng = random.Random(seed)
    if start_rate is None:
        rc = RateController(stated, now=0.0, start_rate=None)
    else:
        rc = RateController(stated, now=0.0, start_rate=start_rate, known_good=known_good)
    window: deque[float] = deque()
    feedback: list[tuple[float, float, bool]] = []  # (arrival of the answer, send time, 429)
    t = accepted = throttled = sends = 0
    last = 0.0
    trace: list[bool] = []
    accepted_at: list[float] = []
    while accepted < jobs:
        while True:
            cuts = rc.cuts
            slot = rc.reserve(now=t)
            while feedback and feedback[0][0] <= slot:
                at, sent, refused = heapq.heappop(feedback)
                if refused:
                    rc.on_throttled(sent_at=sent, now=at)
                else:
                    rc.on_accepted(sent_at=sent, now=at)
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
            accepted_at.append(t)
            trace.append(False)
            heapq.heappush(feedback, (arrival + latency, t, False))
        else:
            throttled += 1
            trace.append(True)
            heapq.heappush(feedback, (arrival + 0.003, t, True))
    half = accepted_at[len(accepted_at) // 2]
    late_rate = (len(accepted_at) - len(accepted_at) // 2 - 1) / (last - half)
    return sends, throttled, accepted / last, trace, late_rate


def test_no_burst_at_start():
    rc = RateController(4.0, now=100.0, start_rate=None)
    slots = [rc.reserve(now=100.0) for _ in range(4)]
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert slots[0] == 100.0
    assert all(g == pytest.approx(1 / (4 * MARGIN)) for g in gaps)


@pytest.mark.parametrize("quota", [2, 10, 50])
def test_told_the_right_quota_never_throttles_and_keeps_it_busy(quota):
    _sends, throttled, rate, _, _ = simulate(quota, quota)
    assert throttled == 0
    assert rate >= 0.97 * quota


@pytest.mark.parametrize("quota", [2, 10, 50])
def test_told_twice_the_quota_converges_with_few_429s(quota):
    sends, throttled, rate, _, _ = simulate(quota, 2 * quota)
    assert throttled / sends <= 0.05
    assert rate >= 0.9 * quota


def test_told_too_little_stays_under_what_it_was_told():
    _, throttled, rate, _, _ = simulate(10, 5)
    assert throttled == 0
    assert rate <= 5.0


def test_a_429_for_a_call_sent_before_the_cut_is_ignored():
    rc = RateController(10.0, now=0.0, start_rate=None)
    for _ in range(12):
        rc.reserve(now=0.0)
    assert rc.on_throttled(sent_at=1.0, now=1.01)
    rate = rc.rate
    assert not rc.on_throttled(sent_at=1.0, now=1.02)
    assert rc.rate == rate


def test_rate_never_exceeds_the_stated_rate_after_probing():
    rc = RateController(3.0, now=0.0, start_rate=None)
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
    rc = RateController(100.0, now=0.0, start_rate=None)
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
    rc = RateController(10.0, now=0.0, start_rate=None)
    rc.reserve(now=0.0)
    rc.sent(at=0.001)  # 1 ms of wake-up lag is not lost
    assert rc.wait_needed(now=0.001) == pytest.approx(1 / (10 * MARGIN) - 0.001)


def test_a_caller_slightly_late_for_its_slot_keeps_the_grid():
    rc = RateController(10.0, now=0.0, start_rate=None)
    gap = 1 / (10 * MARGIN)
    assert rc.reserve(now=0.0) == 0.0
    assert rc.reserve(now=gap + 0.001) == pytest.approx(gap)  # 1 ms late: the grid stands
    assert rc.reserve(now=2 * gap + 0.05) == pytest.approx(2 * gap + 0.05)  # 50 ms: re-anchored


# ------------------------------------------------------------------------------ slow start


def test_slow_start_begins_at_the_default_quota_whatever_the_stated_rate():
    rc = RateController(1000.0, now=0.0)
    assert rc.rate == pytest.approx(DEFAULT_QUOTA * MARGIN)
    assert rc.slow_start
    slow = RateController(1.0, now=0.0)  # stated below the default: that is where it starts
    assert slow.rate == pytest.approx(MARGIN) and not slow.slow_start
    fixed = RateController(1000.0, now=0.0, adaptive=False)  # not adaptive: no slow start
    assert fixed.rate == pytest.approx(1000 * MARGIN)


def test_slow_start_doubles_only_after_a_window_of_accepted_calls_at_the_rate():
    rc = RateController(100.0, now=0.0)
    first = rc.rate
    assert not rc.on_accepted(sent_at=0.0, now=0.5)
    assert rc.on_accepted(sent_at=0.5, now=1.0)  # 2 accepted within a second at ~2/s
    assert rc.rate == pytest.approx(2 * first) and rc.known_good == pytest.approx(first)
    # calls sent before the raise prove nothing about the new rate
    for i in range(10):
        assert not rc.on_accepted(sent_at=0.9 + i * 0.001, now=1.1)
    assert rc.rate == pytest.approx(2 * first)


def test_a_pool_that_cannot_send_at_the_rate_does_not_raise_it():
    rc = RateController(100.0, now=0.0)
    rc.on_accepted(sent_at=0.0, now=0.1)
    rc.on_accepted(sent_at=0.4, now=0.5)  # raised to ~3.94/s at t=0.5
    rate = rc.rate
    # one accepted call a second (latency-bound) never fills a window at ~3.94/s
    for i in range(1, 30):
        assert not rc.on_accepted(sent_at=0.5 + i, now=1.0 + i)
    assert rc.rate == rate


def test_a_throttle_in_slow_start_returns_to_the_rate_last_accepted():
    rc = RateController(1000.0, now=0.0)
    for i in range(4):
        rc.reserve(now=i * 0.5)
    rc.on_accepted(sent_at=0.0, now=0.5)
    rc.on_accepted(sent_at=0.5, now=1.0)
    assert rc.rate == pytest.approx(2 * DEFAULT_QUOTA * MARGIN)
    for _ in range(4):
        rc.reserve(now=1.5)
    assert rc.on_throttled(sent_at=1.6, now=1.61)
    assert not rc.slow_start
    assert rc.rate == pytest.approx(DEFAULT_QUOTA * MARGIN)


@pytest.mark.parametrize("latency", [0.0, 0.5, 2.0])
def test_told_500_times_a_2_per_second_quota_few_429s_in_the_first_100_calls(latency):
    _, _, _, trace, late = simulate(2, 1000.0, jobs=200, latency=latency, start_rate=2.0)
    assert sum(trace[:100]) <= 5
    assert late >= 0.9 * 2  # the rare probes above a quota found twice cost a few percent


@pytest.mark.parametrize(("quota", "stated"), [(10, 20.0), (50, 1000.0), (10, 10.0)])
def test_slow_start_still_converges_to_a_higher_quota(quota, stated):
    _, _, _, trace, late = simulate(quota, stated, jobs=40 * quota, latency=0.5, start_rate=2.0)
    assert late >= 0.95 * quota
    assert sum(trace) / len(trace) <= 0.05


def test_a_head_start_is_slow_start_until_a_window_at_it_is_accepted():
    rc = RateController(10.0, now=0.0, start_rate=HEAD_START, known_good=DEFAULT_QUOTA)
    assert rc.rate == pytest.approx(HEAD_START * MARGIN) and rc.slow_start
    assert rc.known_good == pytest.approx(DEFAULT_QUOTA * MARGIN)  # nothing proven yet
    at = RateController(5.0, now=0.0, start_rate=5.0, known_good=DEFAULT_QUOTA)
    assert at.rate == pytest.approx(at.max_rate) and at.slow_start  # at the stated rate, unproven
    for i in range(5):
        raised = at.on_accepted(sent_at=i * 0.2, now=1.0 + i * 0.2)
    assert raised and not at.slow_start and at.rate == pytest.approx(at.max_rate)
    assert at.known_good == pytest.approx(at.max_rate)


def test_a_throttle_at_an_unproven_head_start_falls_to_the_window_s_estimate():
    rc = RateController(1000.0, now=0.0, start_rate=HEAD_START, known_good=DEFAULT_QUOTA)
    slots = [rc.reserve(now=0.0) for _ in range(3)]  # at ~7.9/s
    assert rc.on_throttled(sent_at=slots[-1], now=slots[-1] + 0.003)  # the quota is 2
    assert not rc.slow_start
    assert rc.rate == pytest.approx(DEFAULT_QUOTA * MARGIN)


@pytest.mark.parametrize("latency", [0.0, 0.5, 2.0])
def test_a_head_start_told_500_times_a_2_per_second_quota_few_429s(latency):
    start = head_start(1000.0, DEFAULT_QUOTA, DEFAULT_QUOTA)
    _, _, _, trace, late = simulate(
        2, 1000.0, jobs=200, latency=latency, start_rate=start, known_good=DEFAULT_QUOTA
    )
    assert sum(trace[:100]) <= 5
    assert late >= 0.9 * 2


@pytest.mark.parametrize(("quota", "stated"), [(10, 10.0), (10, 20.0), (5, 10.0), (50, 1000.0)])
def test_a_head_start_converges_like_slow_start(quota, stated):
    start = head_start(stated, DEFAULT_QUOTA, DEFAULT_QUOTA)
    _, _, _, trace, late = simulate(
        quota, stated, jobs=40 * quota, latency=0.5, start_rate=start, known_good=DEFAULT_QUOTA
    )
    assert late >= 0.95 * quota
    assert sum(trace) / len(trace) <= 0.05


def test_a_head_start_keeps_a_short_run_near_the_stated_quota():
    """60 s at a stated 10/s: slow start from 2/s costs seconds at a fraction of the rate
    (each doubling waits for a window of answers); the head start, one window at 8/s."""
    _, slow_429, slow, _, _ = simulate(10, 10.0, latency=1.0, start_rate=DEFAULT_QUOTA)
    start = head_start(10.0, DEFAULT_QUOTA, DEFAULT_QUOTA)
    _, head_429, head, _, _ = simulate(
        10, 10.0, latency=1.0, start_rate=start, known_good=DEFAULT_QUOTA
    )
    assert slow_429 == head_429 == 0
    assert head >= 0.975 * 10 > slow


def test_a_throttled_call_sent_a_little_after_its_slot_is_not_counted_as_accepted():
    """The pool reports the time a call went out, a few ms after its slot: the quota estimate
    must still leave that call out (counted, a 2/s quota looked like 3/s and every cut was a
    5% step, nine 429s to get down to 2/s)."""
    rc = RateController(1000.0, now=0.0)
    for i in range(3):
        rc.reserve(now=i * 0.508)  # slots at ~1.97/s
    rc.on_accepted(sent_at=0.0, now=1.0)
    assert rc.on_accepted(sent_at=0.508, now=1.5)  # proven: doubled to ~3.94/s
    slot = rc.reserve(now=1.52)
    rc.on_throttled(sent_at=slot + 0.003, now=slot + 0.01)  # went out 3 ms after its slot
    assert rc.ceiling == 2.0
    assert rc.rate == pytest.approx(DEFAULT_QUOTA * MARGIN)


def test_past_slow_start_the_estimate_leaves_out_calls_sent_late_for_their_slot():
    rc = RateController(10.0, now=0.0, start_rate=None)
    slots = [rc.reserve(now=i * 0.3) for i in range(4)]  # a 3.3/s pool under a 10/s rate
    rc.on_throttled(sent_at=slots[-1] + 0.004, now=slots[-1] + 0.01)
    assert rc.ceiling == 3.0  # the three before it, not four
