"""The one rule from a run's outcome to its exit code."""

from __future__ import annotations

import pytest

from batcher.exitcodes import ExitCode, exit_code_for
from batcher.pool import RunCounters, RunResult, StopReason
from jobs import State, Stats


def stats(**by_state: int) -> Stats:
    return Stats(
        by_state={s.value: by_state.get(s.value, 0) for s in State},
        errors_by_code={},
        spend=(),
        attempts=0,
        throttled=0,
        ambiguous=0,
        regenerated=0,
    )


def result(reason: StopReason) -> RunResult:
    return RunResult(
        reason=reason,
        counters=RunCounters(),
        abort_message=None,
        elapsed=1.0,
        first_call_at=None,
        last_call_at=None,
    )


@pytest.mark.parametrize(
    ("reason", "table", "code"),
    [
        (StopReason.FINISHED, {"done": 3}, ExitCode.OK),
        (StopReason.FINISHED, {"done": 2, "failed": 1}, ExitCode.FAILURES),
        (StopReason.FINISHED, {"done": 2, "pending": 1}, ExitCode.STOPPED_EARLY),
        (StopReason.ABORTED, {"pending": 3}, ExitCode.ABORTED),
        (StopReason.UNREACHABLE, {"done": 1, "pending": 3}, ExitCode.ABORTED),
        (StopReason.DATABASE, {"done": 1, "running": 2, "pending": 3}, ExitCode.ABORTED),
        (StopReason.INTERRUPTED, {"done": 3}, ExitCode.INTERRUPTED),
        (StopReason.LIMIT, {"done": 1, "failed": 1, "pending": 1}, ExitCode.STOPPED_EARLY),
        (StopReason.BUDGET, {"done": 1, "generated": 1}, ExitCode.STOPPED_EARLY),
        (StopReason.LIMIT, {"done": 2, "failed": 1}, ExitCode.FAILURES),
        (StopReason.LIMIT, {"done": 3}, ExitCode.OK),
    ],
)
def test_exit_code_for(reason, table, code):
    assert exit_code_for(result(reason), stats(**table)) is code


def test_codes_are_the_documented_numbers():
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130, 141]
