"""The per-lane rate that ``status``, the summary and the report print: calls accepted per
second while the lane sent them, over the runs recorded in ``lane_calls``."""

from __future__ import annotations

from batcher.summary import lane_lines, lanes_json
from jobs import LaneCalls


def run(name: str, first: float, last: float, accepted: int, *, model: str = "m") -> LaneCalls:
    return LaneCalls(
        run=name,
        lane="default",
        model=model,
        quota=2.0,
        calls=accepted,
        accepted=accepted,
        first_accepted_at=first,
        last_accepted_at=last,
    )


def rate(*rows: LaneCalls) -> float | None:
    got = lanes_json(list(rows))["default"]["models"]["m"]["calls_per_second"]
    assert got is None or isinstance(got, float)
    return got


def test_one_run_sends_at_its_calls_over_its_span() -> None:
    assert rate(run("a", 0.0, 10.0, 21)) == 2.0


def test_runs_one_after_another_do_not_count_the_idle_time_between_them() -> None:
    """A run, then a resumed run an hour later: each sent at 2/s."""
    assert rate(run("a", 0.0, 10.0, 21), run("b", 3600.0, 3605.0, 11)) == 2.0


def test_workers_sending_at_once_count_their_calls_together() -> None:
    """Three workers sharing the lane's schedule over the same ten seconds: 2/s together (each
    ~0.67/s), not the 0.65/s of their calls over the sum of their spans."""
    workers = [run("a", 0.0, 10.0, 7), run("b", 0.2, 9.9, 7), run("c", 0.4, 10.0, 7)]
    assert rate(*workers) == 2.0
    line = lane_lines(workers)[0]
    assert "2.00/s of its 2/s (100%)" in line, line


def test_a_later_run_overlapping_a_group_joins_it() -> None:
    """Spans chained by overlap (b starts before a ends, c before b ends) are one stretch."""
    assert rate(run("a", 0.0, 4.0, 9), run("b", 3.0, 8.0, 6), run("c", 7.5, 10.0, 6)) == 2.0


def test_too_little_to_say_gives_no_rate() -> None:
    assert rate(run("a", 0.0, 0.5, 2)) is None
    assert rate(run("a", 0.0, 0.9, 40)) is None  # under a second
    # two workers of one call each at once: three calls over a second together say enough
    assert rate(run("a", 0.0, 2.0, 2), run("b", 1.0, 1.0, 1)) == 1.0
