"""What a database backend of the job store provides, and the queued write both carry out.

The store's semantics (the state table and its fenced transitions, the import's merge, every
read) are written once, in portable SQL, in :mod:`jobs.store` and :mod:`jobs.merge`. A backend
supplies only what the two databases do differently:

* opening the engine, and the clock leases are measured on;
* the hot path's writes (a batch of fenced ``UPDATE``\\ s in one transaction);
* claiming due jobs (SQLite: one writer at a time, a ``SELECT`` then an ``UPDATE``;
  PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so many workers claim at once);
* bulk-loading manifest rows (SQLite: multi-row ``INSERT``\\ s on the driver thread;
  PostgreSQL: ``COPY``);
* the column giving manifest order, and the staging table's DDL;
* translating the driver's errors into :class:`jobs.errors.StoreUnavailable`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..spec import JobRow, KindCounts
from ..states import LEASED, State

__all__ = ["CLAIM_COLUMNS", "LEASED_ORDER", "Backend", "Clock", "Op", "Tally"]

Clock = Callable[[], float]

CLAIM_COLUMNS = (
    "id",
    "state",
    "model",
    "prompt",
    "size",
    "seed",
    "prompt_extend",
    "output",
    "attempts",
    "download_attempts",
    "request_id",
    "image_url",
    "url_expires_at",
    "width",
    "height",
    "sha256",
    "bytes",
    "regenerated",
    "n",
    "params",
    "task_id",
    "task_submitted_at",
    "lane",
)
"""The columns a claim returns, in the order a backend's claim rows carry them."""

LEASED_ORDER = (State.GENERATED, State.SUBMITTED)
"""The leased states a claim takes, in this order (downloads first, then task polls), before
pending jobs."""
assert set(LEASED_ORDER) == LEASED


@dataclass(eq=False, slots=True)
class Op:
    """One queued write of a group commit: an async function of a SQLAlchemy connection
    (``fn``), a function run on the database thread (``sync``, SQLite only), or a fenced
    UPDATE (``sql``, named ``:parameters``) that must change exactly one row (else ``lost``
    is raised)."""

    fn: Callable[[AsyncConnection], Awaitable[Any]] | None
    sync: Callable[[Any], Any] | None = None
    sql: str = ""
    params: dict[str, Any] | None = None
    lost: str = ""
    taken: bool = False
    done: bool = False
    result: Any = None
    error: BaseException | None = None


class Backend(abc.ABC):
    """One database kind under :class:`jobs.store.JobStore` (see the module docstring)."""

    engine: AsyncEngine
    label: str  # names the database in messages (a path, or a URL without its password)
    order_column: str  # the jobs table's column of manifest (insertion) order
    staging_order: str  # the same in the staging table
    shared: bool  # several processes may work on the table at once (no reclaim-all)
    # (key, "type,type,...") of every manifest variable in jobs.vars (JSON objects), in the
    # order they first appear, types named as SQLite's json_each names them
    variables_sql: str
    # (name, CREATE INDEX ...) of backend-only indexes a first import builds at its end
    deferred_indexes: tuple[tuple[str, str], ...] = ()
    # What the last stream_rows into ``jobs`` loaded, per (model, prompt_extend), when the
    # backend counts the rows as they go in (a few C calls a chunk: see Tally); None when it
    # does not (the store then leaves the counts to a scan of the table)
    loaded: KindCounts | None = None

    @abc.abstractmethod
    def translated(self) -> AbstractContextManager[None]:
        """The one place this driver's errors become ``StoreUnavailable``."""

    @abc.abstractmethod
    def default_clock(self) -> Clock:
        """The clock leases and due times are measured on when the caller gives none."""

    async def prepare(self) -> None:  # noqa: B027 (optional hook)
        """Anything to do once the engine exists, before the schema is checked."""

    async def exclusive(self, conn: AsyncConnection) -> None:  # noqa: B027 (optional hook)
        """Serialise the store's exclusive writes (schema, import, reclaim) with other
        processes, inside ``conn``'s transaction (SQLite: ``BEGIN IMMEDIATE`` already does)."""

    @abc.abstractmethod
    async def before_migrating(self, version: int) -> None:
        """Keep a copy of a version-``version`` database before it is upgraded (if possible)."""

    @abc.abstractmethod
    async def after_create(self, conn: AsyncConnection) -> None:
        """Backend-only DDL right after a new database's tables were created."""

    @abc.abstractmethod
    async def write_batch(self, ops: list[Op]) -> None:
        """Run plain fenced ``ops`` (no ``fn``) in one transaction of their own."""

    @abc.abstractmethod
    async def run_updates(self, conn: AsyncConnection, ops: list[Op]) -> None:
        """Run plain fenced ``ops`` inside ``conn``'s transaction."""

    @abc.abstractmethod
    async def claim(
        self,
        submit: Callable[[Op], Awaitable[Any]],
        *,
        limit: int,
        now: float,
        lease: float,
        token: str,
        worker: str,
    ) -> list[tuple[Any, ...]]:
        """Lease up to ``limit`` due jobs (the :data:`LEASED_ORDER` states first, then pending,
        in due and manifest order; a submitted job keeps its ``task_id``) under ``token``; rows
        of :data:`CLAIM_COLUMNS` in that order. ``submit`` queues an :class:`Op` in the store's
        group commit."""

    @abc.abstractmethod
    async def stream_rows(
        self, conn: AsyncConnection, rows: Iterable[JobRow], table: str, now: float | None
    ) -> int:
        """Load every row into ``table`` (``jobs`` as pending jobs created at ``now``, or
        ``staging`` with ``now`` None) inside ``conn``'s transaction; return the count."""

    async def settle(self) -> None:  # noqa: B027 (optional hook)
        """After a first import committed: make the database durable where it belongs (SQLite
        publishes a new file made under a temporary name: see :mod:`jobs.backends.fresh`)."""

    async def before_bulk_load(self, conn: AsyncConnection) -> None:  # noqa: B027 (optional hook)
        """Anything to do in a first import's transaction before the rows go straight into
        the empty ``jobs`` (after the store dropped its deferred indexes)."""

    @abc.abstractmethod
    def staging_ddl(self) -> str:
        """``CREATE TEMP TABLE IF NOT EXISTS staging (...)`` with an order column."""

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads."""
        with self.translated():
            async with self.engine.connect() as conn:
                yield conn

    async def close(self) -> None:
        await self.engine.dispose()


# The places of model, prompt_extend and n in a row of schema.STAGING_COLUMNS
_MODEL, _EXTEND, _N = 2, 6, 9
_KIND = itemgetter(_MODEL, _EXTEND, _N)


class Tally:
    """Jobs and images per (model, prompt_extend) of the rows a first import loads, counted
    as they go in (:attr:`Backend.loaded`). A manifest's chunks almost always hold one model
    and one prompt_extend, which a ``count`` each tells, so counting 1M rows costs tens of
    milliseconds instead of scans of the table after the import."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, bool], list[int]] = {}

    def add(self, values: tuple[Any, ...] | list[Any], width: int) -> None:
        """Count the rows of ``values``: rows of ``width`` import columns one after another
        (SQLite's flat statement parameters)."""
        if values:
            self._count(values[_MODEL::width], values[_EXTEND::width], values[_N::width])

    def add_rows(self, rows: list[JobRow]) -> None:
        """Count ``rows``, one tuple of the import columns each (PostgreSQL's COPY chunks)."""
        if rows:
            models, extends, ns = zip(*map(_KIND, rows), strict=True)
            self._count(models, extends, ns)

    def _count(self, models: Any, extends: Any, ns: Any) -> None:
        rows = len(models)
        if models.count(models[0]) == rows and extends.count(extends[0]) == rows:
            self._add(models[0], extends[0], rows, sum(ns))
            return
        for model, extend, n in zip(models, extends, ns, strict=True):
            self._add(model, extend, 1, n)

    def _add(self, model: str, extend: Any, jobs: int, images: int) -> None:
        got = self.kinds.setdefault((model, bool(extend)), [0, 0])
        got[0] += jobs
        got[1] += images

    def counts(self) -> KindCounts:
        return {kind: (jobs, images) for kind, (jobs, images) in self.kinds.items()}
