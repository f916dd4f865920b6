"""Task polls: spaced by the task's age, bounded, jittered; and a poll's answer parsed."""

from __future__ import annotations

import doctest
import random

import pytest

import batcher.taskpolls
from batcher.client import parse_task
from batcher.taskpolls import MAX_DELAY, MIN_DELAY, TaskClock, poll_delay


def polls_until(seconds: float, seed: int) -> int:
    """How many polls see a task of ``seconds`` end (the first poll at or after its end)."""
    rng = random.Random(seed)
    age, polls = 0.0, 0
    while True:
        age += poll_delay(age, rng)
        polls += 1
        if age >= seconds:
            return polls


@pytest.mark.parametrize("seed", range(20))
def test_a_30_second_task_is_polled_about_ten_times(seed: int) -> None:
    assert polls_until(30, seed) <= 11


@pytest.mark.parametrize(("seconds", "most"), [(3, 4), (10, 7), (120, 18), (600, 50)])
def test_polls_stay_few_for_any_task_length(seconds: float, most: int) -> None:
    assert max(polls_until(seconds, seed) for seed in range(20)) <= most


def test_delays_are_bounded_and_jittered() -> None:
    rng = random.Random(1)
    delays = [poll_delay(age, rng) for age in (0, 0.5, 3, 30, 300, 86_000)]
    assert all(MIN_DELAY * 0.9 <= d <= MAX_DELAY * 1.1 for d in delays)
    assert len({round(poll_delay(100, random.Random(s)), 6) for s in range(10)}) > 1


def test_a_task_clock_counts_from_its_creation_even_across_runs() -> None:
    clock = TaskClock(submitted_at=1000.0)
    assert clock.elapsed(1010.0) == 10.0
    assert clock.elapsed(900.0) == 0.0  # a clock that stepped back
    assert not clock.expired(1000.0 + 86_399)
    assert clock.expired(1000.0 + 86_400)


def test_a_poll_answer_is_read_liberally() -> None:
    ok = parse_task(
        {
            "request_id": "r",
            "output": {
                "task_id": "t",
                "task_status": "SUCCEEDED",
                "results": [
                    {"url": "https://x/a.png?Expires=1700000000", "actual_prompt": "more"},
                    {"code": "InternalError.Algo", "message": "Inference error."},
                ],
                "unknown_field": 1,
            },
            "usage": {"image_count": 1},
        },
        12.0,
    )
    assert (ok.status, ok.image_count, ok.running) == ("SUCCEEDED", 1, False)
    assert ok.images[0].image_url.startswith("https://x/a.png")
    assert ok.images[0].url_expires_at == 1_700_000_000
    assert ok.failed_slots == (("InternalError.Algo", "Inference error."),)
    pending = parse_task({"output": {"task_id": "t", "task_status": "pending"}}, 1.0)
    assert pending.running and pending.status == "PENDING"
    failed = parse_task(
        {"output": {"task_status": "FAILED", "code": "DataInspectionFailed", "message": "no"}}, 1
    )
    assert (failed.code, failed.message, failed.images) == ("DataInspectionFailed", "no", ())


def test_doctests() -> None:
    assert doctest.testmod(batcher.taskpolls).failed == 0
