"""When to poll an asynchronous task: pure delay math, and one gate for a run's polls.

A text-to-image task takes from about ten seconds to a few minutes. Polling it every second
would be a storm (hundreds of polls for slow tasks, thousands across a run); polling every
15 s would add up to 15 s to a fast task. So the wait before the next poll grows with the
task's age: 40% of the time since it was created, at least 1 s and at most 15 s, with ±10%
jitter so that tasks created together do not poll together::

    >>> import random
    >>> round(poll_delay(10.0, random.Random(1)), 2)
    3.71

A 30-second task is then polled about ten times (at 1, 2, 3, 4.2, 5.9, 8.2, 11.5, 16, 22.5
and 31.5 s), a 2-minute one about sixteen. A task older than ``TASK_LIFETIME`` (24 h: the
service forgets it) is not polled again but created again.

:class:`PollGate` spaces every poll of a run by at least ``1 / POLLS_PER_SECOND`` s: the
service's task query limit (20 a second per account) is shared with anything else the
account does, and polls must never compete with generation calls for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import anyio

__all__ = [
    "MAX_DELAY",
    "MIN_DELAY",
    "POLLS_PER_SECOND",
    "TASK_LIFETIME",
    "PollGate",
    "TaskClock",
    "poll_delay",
]

MIN_DELAY = 1.0
MAX_DELAY = 15.0
GROWTH = 0.4
JITTER = 0.1
POLLS_PER_SECOND = 10.0
TASK_LIFETIME = 24 * 3600.0


def poll_delay(age: float, rng: random.Random) -> float:
    """Seconds to wait before polling a task that is ``age`` seconds old."""
    base = min(MAX_DELAY, max(MIN_DELAY, GROWTH * max(0.0, age)))
    return base * rng.uniform(1.0 - JITTER, 1.0 + JITTER)


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskClock:
    """A task's age on the wall clock (it may have been created by an earlier run)."""

    submitted_at: float

    def elapsed(self, now: float) -> float:
        """Seconds since the task was created."""
        return max(0.0, now - self.submitted_at)

    def expired(self, now: float) -> bool:
        """Whether the service no longer keeps the task (24 h)."""
        return self.elapsed(now) >= TASK_LIFETIME


class PollGate:
    """At most ``POLLS_PER_SECOND`` polls a second across the run, first come first served."""

    def __init__(self, rate: float = POLLS_PER_SECOND) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def wait_turn(self) -> None:
        """Wait for the next poll slot and take it."""
        now = anyio.current_time()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await anyio.sleep(slot - now)
