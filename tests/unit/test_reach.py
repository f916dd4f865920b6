"""Reachability: connection failures across the run make one outage; a blip does not."""

from __future__ import annotations

import math

import pytest

from batcher.reach import PROBE_CAP, PROBE_FIRST, STREAK, Reachability


def test_a_blip_on_one_call_does_not_pause_the_run():
    r = Reachability(window=60.0)
    for _ in range(STREAK - 1):
        assert not r.failed(now=1.0)
    r.answered(now=1.1)  # another call got an answer: the streak is over
    assert not r.paused and r.streak == 0
    for _ in range(STREAK - 1):
        assert not r.failed(now=2.0)
    assert not r.paused
    assert r.probe_wait(now=2.0) == 0.0


def test_failures_in_a_row_pause_and_probes_back_off_up_to_a_cap():
    r = Reachability(window=600.0)
    starts = [r.failed(now=10.0 + i * 0.01) for i in range(STREAK)]
    assert starts == [False] * (STREAK - 1) + [True]
    assert r.paused and r.outages == 1
    now = 10.0 + (STREAK - 1) * 0.01
    assert r.probe_wait(now=now) == pytest.approx(PROBE_FIRST)
    waits = []
    for _ in range(8):
        now += r.probe_wait(now=now)
        r.probe_failed(now=now)
        waits.append(r.probe_wait(now=now))
    assert waits[0] == pytest.approx(2 * PROBE_FIRST)
    assert waits == sorted(waits) and waits[-1] == pytest.approx(PROBE_CAP)


def test_calls_sent_before_the_pause_do_not_push_the_probe_back():
    r = Reachability(window=60.0)
    for _ in range(STREAK):
        r.failed(now=0.0)
    wait = r.probe_wait(now=0.0)
    for _ in range(10):
        assert not r.failed(now=0.0)
    assert r.probe_wait(now=0.0) == wait


def test_gives_up_only_past_the_window_counted_from_the_first_failure():
    r = Reachability(window=5.0)
    r.failed(now=100.0)
    r.failed(now=102.0)
    r.failed(now=103.0)
    assert r.paused
    assert not r.gave_up(now=104.9)
    assert r.gave_up(now=105.1)
    assert r.down_for(now=105.1) == pytest.approx(5.1)


def test_an_answer_ends_the_outage():
    r = Reachability(window=5.0)
    for t in range(STREAK):
        r.failed(now=float(t))
    r.answered(now=50.0)
    assert not r.paused and not r.gave_up(now=50.0) and r.down_for(now=50.0) == 0.0
    for t in range(STREAK):  # a later outage starts its own window
        r.failed(now=60.0 + t)
    assert r.outages == 2 and not r.gave_up(now=62.0)


@pytest.mark.parametrize("window", [-1.0, math.inf, math.nan])
def test_the_window_must_be_a_finite_number_of_seconds(window):
    with pytest.raises(ValueError):
        Reachability(window=window)


def test_the_job_database_pauses_at_its_first_failure_and_probes_up_to_its_own_cap():
    db = Reachability(window=30.0, streak=1, probe_cap=5.0)
    assert db.failed(now=0.0) and db.paused and db.outages == 1
    assert not db.failed(now=0.1)  # another write failing in the same outage starts none
    waits = []
    for i in range(6):
        db.probe_failed(now=float(i))
        waits.append(db.probe_wait(now=float(i)))
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert not db.gave_up(now=30.0) and db.gave_up(now=30.5)
    db.answered(now=31.0)
    assert not db.paused and db.down_for(now=31.0) == 0.0
