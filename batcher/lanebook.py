"""The lanes of one run: which may send a job, which is least loaded, which are disabled, and
what each one's calls did.

:class:`LaneBook` is pure bookkeeping (no I/O): the pool asks it which enabled lanes serve a
model, picks among those with a free send slot the one with the fewest calls for its weight,
disables a lane whose account met a fatal error, and reads each (lane, model)'s figures from it
as the rows of ``lane_calls``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from jobs import LaneCalls

from .client import DashScopeClient
from .lanes import Lane

__all__ = ["LaneBook", "LaneTally", "RunLane", "accepted_rate"]


def accepted_rate(n: int, first: float | None, last: float | None) -> float | None:
    """``n`` calls sent between ``first`` and ``last``, per second; None when too few to say
    (fewer than three, or within a second: a rate of a burst means nothing).

    >>> accepted_rate(21, 0.0, 10.0), accepted_rate(2, 0.0, 10.0)
    (2.0, None)
    """
    if first is None or last is None or n < 3:
        return None
    span = last - first
    return (n - 1) / span if span >= 1.0 else None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunLane:
    """A lane as a run uses it: its settings, a client with its key and base URL (all lanes
    share one HTTP session), and what its images record as their endpoint."""

    lane: Lane
    client: DashScopeClient
    endpoint: str

    @property
    def name(self) -> str:
        return self.lane.name


@dataclass(kw_only=True, slots=True)
class LaneTally:
    """What one lane's calls of one model did in this run (see ``jobs.LaneCalls``)."""

    quota: float
    calls: int = 0
    accepted: int = 0
    throttled: int = 0
    first_accepted_at: float | None = None  # Unix send times of accepted calls
    last_accepted_at: float | None = None
    images: int = 0
    cost: Decimal = Decimal(0)
    currency: str | None = None

    @property
    def accepted_per_second(self) -> float | None:
        """Calls accepted per second while sending."""
        return accepted_rate(self.accepted, self.first_accepted_at, self.last_accepted_at)


class LaneBook:
    """The run's lanes, by name, with what they did; see the module docstring.

    ``fallback(model)`` is the run's own rate for a model, for a lane with no quota of its own
    (the ``default`` lane).
    """

    def __init__(self, lanes: Sequence[RunLane], fallback: Callable[[str], float]) -> None:
        if not lanes:
            raise ValueError("a run needs at least one lane")
        self.lanes: dict[str, RunLane] = {lane.name: lane for lane in lanes}
        self._fallback = fallback
        self._sent: dict[str, int] = dict.fromkeys(self.lanes, 0)  # calls started, per lane
        self.tallies: dict[tuple[str, str], LaneTally] = {}
        self.disabled: dict[str, str] = {}  # lane -> why

    def __len__(self) -> int:
        return len(self.lanes)

    def quota_of(self, lane: str, model: str) -> float:
        """The requests/s ``lane`` sends ``model`` at."""
        return self.lanes[lane].lane.rate_for(model, self._fallback(model))

    def tally(self, lane: str, model: str) -> LaneTally:
        """This run's figures of ``lane``'s calls of ``model``."""
        found = self.tallies.get((lane, model))
        if found is None:
            found = self.tallies[(lane, model)] = LaneTally(quota=self.quota_of(lane, model))
        return found

    def serving(self, model: str) -> list[RunLane]:
        """The enabled lanes that serve ``model``."""
        return [
            lane
            for lane in self.lanes.values()
            if lane.name not in self.disabled and lane.lane.serves(model)
        ]

    def share(self, lane: RunLane) -> float:
        """Calls started on ``lane`` for its weight: the least loaded lane gets the next job."""
        return self._sent[lane.name] / lane.lane.weight

    def sent(self, lane: RunLane) -> None:
        """A call was started on ``lane``."""
        self._sent[lane.name] += 1

    def task_lane(self, created_on: str | None, model: str) -> RunLane | None:
        """The lane to poll a task with: the lane that created it (a task is its account's),
        None when that lane is not in this run or disabled. A task from before lanes were
        recorded is polled on the first lane serving its model."""
        if created_on is None:
            serving = self.serving(model)
            return serving[0] if serving else None
        lane = self.lanes.get(created_on)
        return None if lane is None or lane.name in self.disabled else lane

    def disable(self, lane: RunLane, code: str, message: str, advice: str) -> str | None:
        """Disable ``lane`` after an error fatal to its account; the line to show, or None
        when it was disabled already. The advice names the lane's own key variable."""
        if lane.name in self.disabled:
            return None
        advice = advice.replace("DASHSCOPE_API_KEY", lane.lane.key_env)
        self.disabled[lane.name] = f"{code} ({advice})"
        goes_on = (
            "no lane is left"
            if self.all_disabled
            else "the other lanes go on, and its jobs go to them"
        )
        return f"lane {lane.name} disabled: {code}: {message} -- {advice}; {goes_on}"

    @property
    def all_disabled(self) -> bool:
        return all(name in self.disabled for name in self.lanes)

    def why_disabled(self) -> str:
        """Each disabled lane and why, in one phrase."""
        return "; ".join(f"lane {name}: {text}" for name, text in self.disabled.items())

    def rows(self, run: str, *, emulated: bool) -> list[LaneCalls]:
        """This run's figures per lane and model, as ``lane_calls`` keeps them."""
        return [
            LaneCalls(
                run=run,
                lane=lane,
                model=model,
                quota=t.quota,
                calls=t.calls,
                accepted=t.accepted,
                throttled=t.throttled,
                first_accepted_at=t.first_accepted_at,
                last_accepted_at=t.last_accepted_at,
                images=t.images,
                cost=t.cost,
                currency=t.currency,
                emulated=emulated,
            )
            for (lane, model), t in self.tallies.items()
        ]
