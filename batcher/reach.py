"""Whether the service (or the job database) can be reached: one condition for the run, not a
failure per job.

A call that fails at the connection level (refused, DNS, no route, TLS handshake) never reached
the service: it cannot have been billed, and it says nothing about the job. When such failures
follow one another across the run (``STREAK`` in a row, with no answer between them) the
service is *unreachable*: the pool stops claiming, lets one call at a time probe it with
backoff, and gives up once it has been unreachable for longer than the window the user
allowed (``--unreachable-timeout``). Any answer, even an error, ends the outage.

The run tracks its job database the same way (``streak=1``: one lost connection is an
outage, since a database error is never one job's).

Pure arithmetic on times the caller passes in (no clock, no I/O), like the pacer.

>>> r = Reachability(window=60.0)
>>> [r.failed(now=t) for t in (0.0, 0.1, 0.2)]
[False, False, True]
>>> r.paused, round(r.probe_wait(now=0.2), 3), r.gave_up(now=61.0)
(True, 0.5, True)
>>> r.answered(now=61.5); r.paused
False
>>> db = Reachability(window=60.0, streak=1, probe_cap=5.0)
>>> db.failed(now=0.0), [db.probe_failed(now=t) for t in range(4)] and db.probe_wait(now=3.0)
(True, 5.0)
"""

from __future__ import annotations

import math

__all__ = ["PROBE_CAP", "PROBE_FIRST", "STREAK", "Reachability"]

STREAK = 3  # connection failures in a row, with no answer between, that make an outage
PROBE_FIRST = 0.5  # seconds before the first probe once paused
PROBE_CAP = 15.0  # probes back off (doubling) up to this interval


class Reachability:
    """Tracks connection-level failures across the run (see the module docstring).

    ``window`` is how long the service may stay unreachable before the run gives up.
    """

    def __init__(
        self, *, window: float, streak: int = STREAK, probe_cap: float = PROBE_CAP
    ) -> None:
        """``streak``: failures in a row that make an outage; ``probe_cap``: the longest wait
        between probes."""
        if not (window >= 0 and math.isfinite(window)):
            raise ValueError("the unreachable window must be a finite number of seconds")
        self.window = window
        self.needed = streak
        self.cap = probe_cap
        self.streak = 0
        self.down_since: float | None = None  # the first failure of the current streak
        self.paused = False
        self.outages = 0
        self._next_probe = -math.inf
        self._interval = PROBE_FIRST

    def failed(self, *, now: float) -> bool:
        """A call failed at the connection level. Returns True when this starts an outage."""
        self.streak += 1
        if self.down_since is None:
            self.down_since = now
        if self.paused:
            return False  # a call sent before the pause: the probes' backoff is unchanged
        if self.streak >= self.needed:
            self.paused = True
            self.outages += 1
            self._interval = PROBE_FIRST
            self._next_probe = now + self._interval
            return True
        return False

    def answered(self, *, now: float) -> None:
        """The service answered a call (success or an API error): it is reachable."""
        del now
        self.streak = 0
        self.down_since = None
        self.paused = False
        self._interval = PROBE_FIRST
        self._next_probe = -math.inf

    def probe_wait(self, *, now: float) -> float:
        """Seconds until the next probe may go (0 when it may go now, or when not paused)."""
        return max(0.0, self._next_probe - now) if self.paused else 0.0

    def probe_failed(self, *, now: float) -> None:
        """The probe got no answer: the next one waits twice as long (up to ``PROBE_CAP``)."""
        self.streak += 1
        self._interval = min(self.cap, self._interval * 2)
        self._next_probe = now + self._interval

    def down_for(self, *, now: float) -> float:
        """Seconds since the first failure of the current streak (0 when reachable)."""
        return 0.0 if self.down_since is None else max(0.0, now - self.down_since)

    def gave_up(self, *, now: float) -> bool:
        """True once paused for longer than the window."""
        return self.paused and self.down_for(now=now) > self.window
