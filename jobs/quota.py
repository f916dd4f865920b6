"""The send schedule several workers of one PostgreSQL run keep to together.

Theory of operation
-------------------
The service counts requests per account and model over a sliding second. Workers that share
a run's PostgreSQL database (on one host or several) and one account must therefore share one
schedule, or N of them send N times the quota. One row of ``quota_schedule`` per (lane, model)
is that schedule, a lane being an account (an API key) by name:

* ``next_at`` is the next free send slot, on the database server's clock (so hosts whose
  clocks disagree still agree on the grid), and ``interval_s`` the spacing every worker
  keeps to together. A worker reserves its next slot with one ``UPDATE ... RETURNING``
  (``slot = greatest(next_at, now + lead)``, ``next_at = slot + interval``): the row lock
  orders concurrent reservers, so no two slots are ever closer than the interval, whichever
  workers hold them. The statement also logs the slot in ``quota_sends``.
* Workers may be told different rates (``--rps``): the row keeps the spacing of the lowest
  (``least_s``), and no reservation, raise or probe goes faster.
* The adaptive state of the rate (slow start, the last cut, the next probe, the last quota
  estimate) sits in the same row, so one worker throttled lowers the rate of all, and slow
  start raises it for all. The decisions themselves are the caller's (pure functions of the
  row and the window's sends, see ``batcher.sharedpacing``): :meth:`QuotaSchedule.adapt`
  locks the row, hands it and the logged sends of the last seconds to the decision, and
  writes back what was decided, in one short transaction.
* A throttled send is marked in ``quota_sends``, so the sends of the service's window that
  were accepted (across every worker) estimate the quota, as a single process estimates it
  from its own sends. Rows older than :data:`KEEP` seconds are deleted as the log grows.
* A schedule left idle for :data:`STALE` seconds (an earlier run's) starts over when a worker
  joins: in slow start, from the joining worker's start rate or from the rate the schedule
  last held, whichever is faster (never above the joiner's own rate). The rate it held is
  the account's quota as that run found it; started at again it is a head start, not proven
  (``known_good`` is the joiner's), so if the quota has changed since, the first 429 falls
  back to the window's estimate at once.

The SQL is PostgreSQL's (``greatest``, ``clock_timestamp``, ``FOR UPDATE``): a SQLite run
folder has one process working it, which paces itself alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import text

from .backends import Backend

__all__ = ["KEEP", "STALE", "QuotaSchedule", "QuotaState", "Reserved", "Send"]

KEEP = 10.0  # seconds of sends kept in the log (a decision reads the last two windows)
STALE = 60.0  # seconds idle after which a schedule starts over (slow start, see _JOIN)
PRUNE_EVERY = 64  # reservations between two prunes of the log
_NOW = "(SELECT extract(epoch FROM clock_timestamp())::float8 AS c) AS t"


@dataclass(frozen=True, kw_only=True, slots=True)
class QuotaState:
    """The adaptive part of one schedule row (times on the server's clock, in seconds).

    ``probe_at`` is ``inf`` until the first cut (probes look for more only after a cut)."""

    next_at: float
    interval_s: float
    least_s: float  # the spacing of the lowest rate any worker was told (none goes faster)
    slow_start: bool
    known_good: float
    raised_at: float
    cut_at: float
    held_at: float  # when a throttled answer last held the schedule back without a cut
    probe_at: float
    probe_every: float
    ceiling: float | None
    cuts: int

    @property
    def rate(self) -> float:
        """Sends a second, every worker together."""
        return 1.0 / max(self.interval_s, self.least_s)


_STATE_COLUMNS = tuple(f.name for f in fields(QuotaState))


@dataclass(frozen=True, kw_only=True, slots=True)
class Reserved:
    """A reserved slot: when to send (server clock), the server's clock when the statement ran,
    and the row as it stands after the reservation."""

    slot: float
    server_now: float
    state: QuotaState


@dataclass(frozen=True, kw_only=True, slots=True)
class Send:
    """A logged slot: when it was to go out, and whether its call was throttled."""

    at: float
    throttled: bool


Decide = Callable[[QuotaState, list[Send], float], QuotaState | None]
"""A decision: (the row, the logged sends of the last seconds in time order, the server's
clock) -> the new row, or None to leave it as it is."""

# A worker joining a live schedule keeps it, only slowing it to its own stated rate if that is
# lower; one joining a schedule idle for STALE seconds starts it over from its own values, but
# at the spacing the schedule last held when that is closer (the last rate proven in slow start,
# else the rate it kept), never closer than the joiner's own least spacing: a head start, in
# slow start whatever the joiner's start was, until a window at it is accepted.
_IDLE = "quota_schedule.updated_at < EXCLUDED.updated_at - :stale"
_HELD = (
    "CASE WHEN quota_schedule.slow_start = 1 THEN quota_schedule.known_good "
    "ELSE greatest(quota_schedule.interval_s, quota_schedule.least_s) END"
)
_RESTART = f"greatest(EXCLUDED.least_s, least(EXCLUDED.interval_s, {_HELD}))"
_JOIN = text(
    f"INSERT INTO quota_schedule (lane, model, last_slot, updated_at, {', '.join(_STATE_COLUMNS)}) "
    "SELECT :lane, :model, t.c, t.c, t.c, :interval_s, :least_s, :slow_start, :known_good, t.c, "
    "'-Infinity'::float8, '-Infinity'::float8, 'Infinity'::float8, :probe_every, NULL, 0 "
    "FROM " + _NOW + " "
    "ON CONFLICT (lane, model) DO UPDATE SET "
    + ", ".join(
        f"{c} = CASE WHEN {_IDLE} THEN EXCLUDED.{c} ELSE quota_schedule.{c} END"
        for c in ("last_slot", "updated_at", *_STATE_COLUMNS)
        if c not in ("least_s", "interval_s", "slow_start")
    )
    + f", least_s = CASE WHEN {_IDLE} THEN EXCLUDED.least_s "
    "ELSE greatest(quota_schedule.least_s, EXCLUDED.least_s) END"
    + f", interval_s = CASE WHEN {_IDLE} THEN {_RESTART} ELSE quota_schedule.interval_s END"
    + f", slow_start = CASE WHEN NOT {_IDLE} THEN quota_schedule.slow_start "
    f"WHEN {_RESTART} < EXCLUDED.interval_s THEN 1 ELSE EXCLUDED.slow_start END"
)
_RETURN_STATE = ", ".join(f"r.{c}" for c in _STATE_COLUMNS)
# Probing rides on the reservation: past ``probe_at`` (and out of slow start) the spacing
# shrinks by ``probe_up``, never below the least spacing (of this worker, or of any).
_RESERVE = text(
    "WITH r AS (UPDATE quota_schedule AS q SET "
    "last_slot = greatest(q.next_at, t.c + :lead), "
    "next_at = greatest(q.next_at, t.c + :lead) "
    "+ greatest(q.interval_s, q.least_s, :min_interval), "
    "interval_s = CASE WHEN q.slow_start = 0 AND t.c >= q.probe_at "
    "AND q.interval_s > greatest(:min_interval, q.least_s) "
    "THEN greatest(:min_interval, q.least_s, q.interval_s / :probe_up) ELSE q.interval_s END, "
    "probe_at = CASE WHEN q.slow_start = 0 AND t.c >= q.probe_at "
    "THEN t.c + q.probe_every ELSE q.probe_at END, "
    "updated_at = t.c "
    f"FROM {_NOW} WHERE q.lane = :lane AND q.model = :model "
    "RETURNING q.*, t.c AS server_now), "
    "logged AS (INSERT INTO quota_sends (lane, model, at) "
    "SELECT :lane, :model, r.last_slot FROM r) "
    f"SELECT r.last_slot, r.server_now, {_RETURN_STATE} FROM r"
)
_LOCK = text(
    f"SELECT {', '.join(_STATE_COLUMNS)}, (SELECT t.c FROM {_NOW}) "
    "FROM quota_schedule WHERE lane = :lane AND model = :model FOR UPDATE"
)
_MARK = text(
    "UPDATE quota_sends SET throttled = 1 WHERE lane = :lane AND model = :model AND at = :at"
)
_SENDS = text(
    "SELECT at, throttled FROM quota_sends WHERE lane = :lane AND model = :model "
    "AND at > :since ORDER BY at"
)
_WRITE = text(
    "UPDATE quota_schedule SET "
    + ", ".join(f"{c} = :{c}" for c in _STATE_COLUMNS)
    + " WHERE lane = :lane AND model = :model"
)
_PUSH = text(
    "UPDATE quota_schedule SET next_at = greatest(next_at + :shift, :after + interval_s) "
    "WHERE lane = :lane AND model = :model"
)
_FORGET = text("DELETE FROM quota_sends WHERE lane = :lane AND model = :model AND at = :at")
_PRUNE = text(
    "DELETE FROM quota_sends WHERE lane = :lane AND model = :model "
    f"AND at < (SELECT t.c FROM {_NOW}) - :keep"
)


class QuotaSchedule:
    """One (lane, model) schedule row of a shared job table (see the module docstring).

    >>> schedule = QuotaSchedule(backend, lane="default", model="z-image-turbo")  # doctest: +SKIP
    >>> await schedule.join(interval_s=0.5, slow_start=True, probe_every=5.0)  # doctest: +SKIP
    >>> (await schedule.reserve(min_interval=0.1, lead=0.005)).slot  # doctest: +SKIP
    1764412345.12
    """

    def __init__(self, backend: Backend, *, lane: str, model: str) -> None:
        self._backend = backend
        self.lane = lane
        self.model = model
        self._key = {"lane": lane, "model": model}
        self._reserved = 0

    async def join(
        self,
        *,
        interval_s: float,
        least_s: float,
        slow_start: bool,
        probe_every: float,
        known_good_s: float | None = None,
    ) -> tuple[float, QuotaState]:
        """Make the row unless it exists (or start an idle one over, from these values);
        ``least_s`` is this worker's spacing at the rate it was told: the schedule never goes
        faster than the lowest rate any of its workers was told. ``known_good_s``: the spacing
        a throttled slow start falls back to at worst (default ``interval_s``; wider for a
        head start nothing has proven). Returns the server's clock as it was read, and the
        row."""
        params = {
            **self._key,
            "interval_s": interval_s,
            "least_s": least_s,
            "slow_start": int(slow_start),
            "known_good": interval_s if known_good_s is None else known_good_s,
            "probe_every": probe_every,
            "stale": STALE,
        }
        with self._backend.translated():
            async with self._backend.engine.begin() as conn:
                await conn.execute(_JOIN, params)
                found = (await conn.execute(_LOCK, self._key)).one()
        return float(found[-1]), _state(found[:-1])

    async def reserve(self, *, min_interval: float, lead: float, probe_up: float) -> Reserved:
        """Reserve the next send slot: no sooner than ``lead`` seconds from the server's now,
        and at least ``min_interval`` (this worker's stated rate) before the next one."""
        params = {**self._key, "min_interval": min_interval, "lead": lead, "probe_up": probe_up}
        with self._backend.translated():
            async with self._backend.engine.begin() as conn:
                row = (await conn.execute(_RESERVE, params)).one()
                self._reserved += 1
                if self._reserved % PRUNE_EVERY == 0:
                    await conn.execute(_PRUNE, {**self._key, "keep": KEEP})
        return Reserved(slot=float(row[0]), server_now=float(row[1]), state=_state(row[2:]))

    async def adapt(self, decide: Decide, *, throttled_at: float | None = None) -> QuotaState:
        """Run ``decide`` on the locked row and the log's last seconds, and write its answer.

        ``throttled_at``: first mark the send of that slot as throttled (it then counts in
        no window as accepted). Returns the row as it stands after."""
        with self._backend.translated():
            async with self._backend.engine.begin() as conn:
                if throttled_at is not None:
                    await conn.execute(_MARK, {**self._key, "at": throttled_at})
                found = (await conn.execute(_LOCK, self._key)).one()
                state, now = _state(found[:-1]), float(found[-1])
                rows = await conn.execute(_SENDS, {**self._key, "since": now - KEEP})
                sends = [Send(at=float(r[0]), throttled=bool(r[1])) for r in rows]
                decided = decide(state, sends, now)
                if decided is None or decided == state:
                    return state
                await conn.execute(_WRITE, {**self._key, **_params(decided)})
        return decided

    async def push(self, *, after: float, shift: float = 0.0) -> None:
        """A send went out late, at ``after``: the next slot is one interval after it, and every
        slot from the next free one on moves ``shift`` seconds later (the lateness past the
        schedule's slack: the window one quota's worth of sends later must not hold it)."""
        with self._backend.translated():
            async with self._backend.engine.begin() as conn:
                await conn.execute(_PUSH, {**self._key, "after": after, "shift": shift})

    async def forget(self, slot: float) -> None:
        """A reserved slot was not used: it is no send (a window holding it is not full)."""
        with self._backend.translated():
            async with self._backend.engine.begin() as conn:
                await conn.execute(_FORGET, {**self._key, "at": slot})


def _state(values: Any) -> QuotaState:
    data = dict(zip(_STATE_COLUMNS, values, strict=True))
    ceiling = data["ceiling"]
    return QuotaState(
        next_at=float(data["next_at"]),
        interval_s=float(data["interval_s"]),
        least_s=float(data["least_s"]),
        slow_start=bool(data["slow_start"]),
        known_good=float(data["known_good"]),
        raised_at=float(data["raised_at"]),
        cut_at=float(data["cut_at"]),
        held_at=float(data["held_at"]),
        probe_at=float(data["probe_at"]),
        probe_every=float(data["probe_every"]),
        ceiling=None if ceiling is None else float(ceiling),
        cuts=int(data["cuts"]),
    )


def _params(state: QuotaState) -> dict[str, Any]:
    out: dict[str, Any] = {c: getattr(state, c) for c in _STATE_COLUMNS}
    out["slow_start"] = int(state.slow_start)
    return out
