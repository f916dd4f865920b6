"""The PostgreSQL backend: one run's job table in a database many workers share.

Theory of operation
-------------------
The URL (``postgresql://user@host:5432/name``) names a database that holds one run: its
``jobs``, ``job_images``, ``job_history`` and ``meta`` tables, created on first open. Workers
on several hosts open the same URL and work the same table at once:

* A claim is one ``UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``: each
  worker locks the due rows it takes and passes over the rows another worker is taking, so
  claims never wait on each other and no job is handed out twice. A job held by a worker
  stays fenced by its claim token, as on SQLite.
* Lease times are measured on the database server's clock: at open the store measures the
  offset of this host's clock to the server's and reads the time through it, so hosts whose
  clocks disagree still agree on when a lease runs out.
* The store's exclusive writes (schema set-up, imports, reclaims) first take a transaction
  advisory lock, so two workers starting at once do not both create the tables or both import
  the manifest; the hot path's fenced writes do not take it.
* A first import loads the rows with ``COPY`` into the empty table, later imports into a
  temporary staging table, merged as on SQLite. A worker thread pulls the manifest's rows
  (from the helper process that reads a big one, :mod:`jobs.readahead`) a chunk at a time and
  writes them as ``COPY`` text, which asyncpg passes on as it is (see :func:`copy_text`: a
  third of the cost of asyncpg's ``copy_records_to_table``, an async step and an encoder call a
  row, and the helper, the busier process, is spared it). A first import (see
  :meth:`PostgresBackend.before_bulk_load`) truncates the empty table in its transaction so
  the ``COPY`` may ``FREEZE`` the rows (no hint bits for the first reads to write, the pages
  all-visible at once), and commits without waiting for the WAL flush
  (``synchronous_commit = off`` for that one transaction; why that is safe is said there).
  Dropping the ``output_key`` constraint and the failed-code index for the load and building
  them after it was tried and measured 2-3% slower: the COPY is paced by the manifest's
  parsing, so the server keeps them up meanwhile for nothing.
* Errors are translated by SQLSTATE, never by message text. A lost or refused connection
  (SQLSTATE class 08, the server shutting down or starting up: 57P01-57P03, a socket error, a
  connection SQLAlchemy found dead) is :class:`jobs.errors.StoreUnreachable`, a condition a
  run waits out; anything else is :class:`jobs.errors.StoreUnavailable`. The engine pings a
  pooled connection before handing it out, so once the server is back the next write gets a
  new connection instead of the dead one.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from typing import Any

import anyio
from sqlalchemy import make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from .. import schema
from ..errors import LeaseLost, StoreUnavailable, StoreUnreachable
from ..spec import JobRow
from ..states import State
from ..version import DATABASE_URL_SCHEMES
from .base import CLAIM_COLUMNS, LEASED_ORDER, Backend, Clock, Op, Tally

__all__ = ["PostgresBackend", "is_database_url"]

COPY_CHUNK = 8192  # rows pulled from the manifest and written as COPY text per thread trip
_NULL = "\\N"  # COPY's text form: NULL; a backslash in a value is written as two
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
CONNECT_TIMEOUT = 10.0  # s: a new connection that takes longer fails (StoreUnreachable)
# s: a statement unanswered for this long means the connection is gone (a network that drops
# packets silently gives no error); the URL's ?command_timeout=S sets another (and bounds
# connecting too, when shorter than CONNECT_TIMEOUT). The import's
# COPY and the wait for the store's advisory lock are exempt: they may rightly take long.
COMMAND_TIMEOUT = 60.0
_LONG = 7 * 86_400.0  # s: "no limit" for asyncpg, which reads a timeout of None as the default
_LOCK_KEY = 0x62617463  # the advisory lock of the store's exclusive writes ("batc")
_ACTIVE = schema.ACTIVE_IN_SQL  # see there: not the OR form SQLite's index is written in
_RETURNING = ", ".join(f"jobs.{c}" for c in CLAIM_COLUMNS)
# One statement per leased state (generated: downloads first, then submitted: task polls),
# each keeping the job's state (a submitted job keeps its task_id), as on SQLite.
_TAKE_LEASED = text(
    "UPDATE jobs SET claim_token = :token, lease_expires_at = :lease, worker = :worker "
    "FROM (SELECT id FROM jobs WHERE state = :state AND "
    "(lease_expires_at IS NULL OR lease_expires_at < :now) AND next_attempt_at <= :now "
    f"AND {_ACTIVE} ORDER BY next_attempt_at, seq LIMIT :limit FOR UPDATE SKIP LOCKED) AS picked "
    f"WHERE jobs.id = picked.id RETURNING {_RETURNING}, jobs.next_attempt_at, jobs.seq"
)
# A running job whose lease ran out (its worker died, or lost the database for longer than
# the lease) is taken over as a pending one would be: no attempt charged (whether its call
# went out is unknown), and the old holder's token no longer matches, so its late writes are
# refused. SQLite reclaims such jobs at the start of a run instead; on a shared table the
# other workers are live, and take them over only once the lease has expired. A task create
# whose answer was never recorded (task_id '') is counted as ambiguous and forgotten, as
# SQLite's reclaim does: the new holder creates the task again.
_TAKE_EXPIRED = text(
    "UPDATE jobs SET claim_token = :token, lease_expires_at = :lease, worker = :worker, "
    "ambiguous = jobs.ambiguous + CASE WHEN jobs.task_id = '' THEN 1 ELSE 0 END, "
    "task_id = CASE WHEN jobs.task_id = '' THEN NULL ELSE jobs.task_id END "
    f"FROM (SELECT id, lease_expires_at AS ran_out FROM jobs WHERE state = '{State.RUNNING.value}' "
    "AND lease_expires_at < :now "
    f"AND {_ACTIVE} ORDER BY lease_expires_at, seq LIMIT :limit FOR UPDATE SKIP LOCKED) "
    # ordered by when the old lease ran out: RETURNING gives the new lease, the same for all
    f"AS picked WHERE jobs.id = picked.id RETURNING {_RETURNING}, picked.ran_out, jobs.seq"
)
_TAKE_PENDING = text(
    f"UPDATE jobs SET state = '{State.RUNNING.value}', claim_token = :token, "
    "lease_expires_at = :lease, worker = :worker, started_at = coalesce(jobs.started_at, :now) "
    f"FROM (SELECT id FROM jobs WHERE state = '{State.PENDING.value}' AND next_attempt_at <= :now "
    f"AND {_ACTIVE} ORDER BY next_attempt_at, seq LIMIT :limit FOR UPDATE SKIP LOCKED) AS picked "
    f"WHERE jobs.id = picked.id RETURNING {_RETURNING}, jobs.next_attempt_at, jobs.seq"
)
# The manifest order of rows: an identity column (SQLite has its rowid), and the claim's index
# on (state, due time, order) so that taking the next jobs of a million reads a few rows.
_DUE_INDEX = (
    "ix_jobs_due",
    f"CREATE INDEX IF NOT EXISTS ix_jobs_due ON jobs (state, next_attempt_at, seq) WHERE {_ACTIVE}",
)
_AFTER_CREATE = (
    "ALTER TABLE jobs ADD COLUMN seq BIGINT GENERATED ALWAYS AS IDENTITY",
    _DUE_INDEX[1],
)
_STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS staging (
    id TEXT NOT NULL, line INTEGER NOT NULL, model TEXT NOT NULL, prompt TEXT NOT NULL,
    size TEXT NOT NULL, seed BIGINT NOT NULL, prompt_extend INTEGER NOT NULL,
    output TEXT NOT NULL, output_key TEXT NOT NULL, n INTEGER NOT NULL, params TEXT, vars TEXT,
    seq BIGINT GENERATED ALWAYS AS IDENTITY
)
"""
# SQLSTATE classes and codes, and what they mean to a user.
_BY_CLASS = {
    "08": "cannot reach the job database at {label}",
    "28": "the job database at {label} refused the login",
    "53": "the job database server at {label} is out of resources (disk, memory or connections)",
    "57": "the job database server at {label} is shutting down or restarting",
}
# The server is going away or not yet there: the connection will come back (a restart).
_GONE = frozenset({"57P01", "57P02", "57P03"})
_BY_CODE = {
    "3D000": "there is no database named by {label}: create it first (createdb)",
    "25006": "the job database at {label} is read-only",
    "53100": "the database server's disk is full: the job database could not be written",
    "42501": "the job database at {label} refused the access (permissions)",
}


def is_database_url(target: str) -> bool:
    """Whether ``target`` names a PostgreSQL database rather than a SQLite file."""
    return target.startswith(DATABASE_URL_SCHEMES)


def _command_timeout(url: URL) -> float:
    """The URL's ``?command_timeout=S`` (seconds), else :data:`COMMAND_TIMEOUT`."""
    given = url.query.get("command_timeout")
    if given is None:
        return COMMAND_TIMEOUT
    try:
        value = float(given if isinstance(given, str) else given[-1])
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise StoreUnavailable(
            f"the database URL's command_timeout must be a number of seconds above 0: {given!r}"
        )
    return value


def engine_url(target: str) -> URL:
    """The SQLAlchemy URL of a ``postgresql://`` URL, through asyncpg."""
    try:
        url = make_url(target)
    except ArgumentError as exc:
        raise StoreUnavailable(
            "the database URL is not valid (postgresql://user@host/name)"
        ) from exc
    return url.set(drivername="postgresql+asyncpg")


class PostgresBackend(Backend):
    """A PostgreSQL database (see the module docstring)."""

    order_column = "seq"
    staging_order = "seq"
    shared = True
    # json (not jsonb) keeps each object's key order; the types are named as SQLite's
    # json_each names them, so both backends describe the variables alike.
    variables_sql = (
        "SELECT v.key, string_agg(DISTINCT CASE json_typeof(v.value) "
        "WHEN 'number' THEN CASE WHEN v.value::text ~ '^-?[0-9]+$' THEN 'integer' "
        "ELSE 'real' END WHEN 'string' THEN 'text' WHEN 'boolean' THEN v.value::text "
        "ELSE json_typeof(v.value) END, ',') "
        "FROM jobs, json_each(jobs.vars::json) WITH ORDINALITY AS v(key, value, n) "
        "WHERE jobs.vars IS NOT NULL GROUP BY v.key ORDER BY MIN(jobs.seq * 65536 + v.n)"
    )
    deferred_indexes = (_DUE_INDEX,)

    def __init__(self, target: str) -> None:
        self._bulk = False  # inside a first import's bulk load: COPY into jobs may FREEZE
        url = engine_url(target)
        timeout = _command_timeout(url)
        url = url.difference_update_query(["command_timeout"])
        self.label = url.set(drivername="postgresql").render_as_string(hide_password=True)
        # pre_ping: a pooled connection the server dropped (a restart, a failover) is replaced
        # on checkout rather than failing the next write. Connecting and every statement give
        # up in time (CONNECT_TIMEOUT, COMMAND_TIMEOUT): a server cut off without a word must
        # still turn into an error the run can wait out, never a worker hung for good.
        #
        # The server gives up too: a session of this worker left idle inside a transaction
        # for as long is ended (idle_in_transaction_session_timeout), so a worker cut off
        # between two statements of a claim, a commit or a quota reservation does not keep
        # the rows it locked (a job's, the quota schedule's) from the other workers until
        # the server's TCP keepalive notices, hours later. The exclusive transactions (an
        # import) lift it: their worker may rightly think between two statements.
        self.engine = create_async_engine(
            url,
            pool_size=4,
            max_overflow=8,
            pool_pre_ping=True,
            connect_args={
                "timeout": min(CONNECT_TIMEOUT, timeout),
                "command_timeout": timeout,
                "server_settings": {
                    "idle_in_transaction_session_timeout": str(max(1, round(timeout * 1000)))
                },
            },
        )
        self._offset = 0.0

    @contextmanager
    def translated(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            cause = exc.orig or exc
            if exc.connection_invalidated and not _lost(cause):  # closed under a statement
                message = f"lost the connection to the job database at {self.label}"
                raise StoreUnreachable(message) from exc
            raise _error(_lost(cause))(self._message(cause)) from exc
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"the job database failed: {type(exc).__name__}") from exc
        except OSError as exc:  # the server could not be reached at all
            raise StoreUnreachable(self._message(exc)) from exc
        except Exception as exc:
            if _sqlstate(exc) is None:
                raise
            raise _error(_lost(exc))(self._message(exc)) from exc

    def _message(self, exc: BaseException) -> str:
        state = _sqlstate(exc)
        if state is None:
            if isinstance(exc, OSError):
                reason = exc.strerror or type(exc).__name__
                if isinstance(exc, TimeoutError) and not exc.strerror:
                    reason = "no answer in time (the network or the server is not responding)"
                return f"cannot reach the job database at {self.label}: {reason}"
            return f"the job database at {self.label} failed: {type(exc).__name__}"
        found = _BY_CODE.get(state) or _BY_CLASS.get(state[:2])
        if found is not None:
            return found.format(label=self.label)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the job database failed (SQLSTATE {state}): {first}"

    def default_clock(self) -> Clock:
        offset = self._offset
        return lambda: time.time() + offset

    async def prepare(self) -> None:
        """Measure this host's clock against the server's (the middle of the round trip)."""
        with self.translated():
            async with self.engine.connect() as conn:
                before = time.time()
                server = (
                    await conn.execute(text("SELECT extract(epoch from clock_timestamp())"))
                ).scalar_one()
                after = time.time()
        self._offset = float(server) - (before + after) / 2

    async def exclusive(self, conn: AsyncConnection) -> None:
        # Through SQLAlchemy first: its asyncpg adapter opens the transaction on the server
        # at its first statement, and one sent on the raw connection before that runs outside
        # it (a transaction-level lock taken there is released at once). This one lifts the
        # server's limit on idle time in the transaction: an import may rightly think between
        # two statements.
        await conn.exec_driver_sql("SET LOCAL idle_in_transaction_session_timeout = 0")
        # another worker may hold it through a long import: no statement timeout on the wait
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        await driver.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY, timeout=_LONG)

    async def before_migrating(self, version: int) -> None:
        # No copy: the steps run in one transaction, so a failure leaves the old version; a
        # backup of a shared server is its operator's (pg_dump), not one worker's.
        return None

    async def after_create(self, conn: AsyncConnection) -> None:
        for statement in _AFTER_CREATE:
            await conn.exec_driver_sql(statement)

    def staging_ddl(self) -> str:
        return _STAGING_DDL

    async def before_bulk_load(self, conn: AsyncConnection) -> None:
        """Ready the empty ``jobs`` for a first import's ``COPY`` (see the module docstring).

        ``synchronous_commit = off`` (this transaction only) lets its commit return before
        its WAL is flushed. The import is still atomic, and it is still durable before
        anything can depend on it: WAL is one sequence, so the first later transaction that
        commits normally (setting the manifest's digest, a worker's claim) flushes it too; a
        server crash in between loses the whole import and nothing else, and the next ``plan``
        or ``run`` imports the manifest again (nothing was claimed from it)."""
        await conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        # The store builds the claim's indexes at the end: a sort each, in memory.
        await conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")
        # Truncated in this transaction, the table may be loaded with COPY ... FREEZE.
        await conn.exec_driver_sql("TRUNCATE jobs")
        self._bulk = True

    async def run_updates(self, conn: AsyncConnection, ops: list[Op]) -> None:
        for o in ops:
            if o.sync is not None:
                raise TypeError("PostgreSQL runs no driver-thread functions")
            if (await conn.execute(_text(o.sql), o.params or {})).rowcount != 1:
                o.error = LeaseLost(o.lost)

    async def write_batch(self, ops: list[Op]) -> None:
        async with self.engine.begin() as conn:
            await self.run_updates(conn, ops)

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
        # Its own transaction, outside the group commit: SKIP LOCKED lets claims run at once.
        params = {"token": token, "lease": lease, "worker": worker, "now": now}
        with self.translated():
            async with self.engine.begin() as conn:
                rows: list[Any] = []
                steps = [(_TAKE_LEASED, {"state": s.value}) for s in LEASED_ORDER]
                steps += [(_TAKE_EXPIRED, {}), (_TAKE_PENDING, {})]
                for statement, extra in steps:
                    if len(rows) >= limit:
                        break
                    more = {**params, **extra, "limit": limit - len(rows)}
                    # RETURNING emits rows in no promised order: due time, then manifest order
                    rows += sorted(await conn.execute(statement, more), key=lambda r: r[-2:])
        return [tuple(r)[:-2] for r in rows]

    async def stream_rows(
        self, conn: AsyncConnection, rows: Iterable[JobRow], table: str, now: float | None
    ) -> int:
        """``COPY`` every row into ``table``; the manifest is read on a worker thread, a chunk
        at a time written as ``COPY`` text (:func:`copy_text`), as asyncpg sends the text."""
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        columns = list(schema.STAGING_COLUMNS)
        tail: tuple[Any, ...] = ()
        if now is not None:
            columns += ["state", "created_at"]
            tail = ("pending", now)
        freeze, self._bulk = self._bulk and table == "jobs", False
        total = 0
        source = iter(rows)
        self.loaded = None
        tally = Tally() if table == "jobs" else None  # a first import: see Backend.loaded

        def take() -> bytes:
            nonlocal total
            chunk = list(islice(source, COPY_CHUNK))
            total += len(chunk)
            if tally is not None:
                tally.add_rows(chunk)
            return copy_text(chunk, tail)

        async def text() -> AsyncIterator[bytes]:
            while data := await anyio.to_thread.run_sync(take):
                yield data

        try:
            await driver.copy_to_table(
                table,
                source=text(),
                columns=columns,
                format="text",
                freeze=freeze or None,
                timeout=_LONG,
            )
        finally:
            close = getattr(source, "close", None)
            if close is not None:  # a generator: stop it now (a helper process with it)
                close()
        if tally is not None:
            self.loaded = tally.counts()
        return total


def copy_text(rows: list[JobRow], tail: tuple[Any, ...] = ()) -> bytes:
    """``rows`` as ``COPY ... FROM STDIN`` text (UTF-8, a tab between fields, ``\\N`` for
    NULL, a line a row): each row's columns (``prompt_extend`` as 0 or 1), then ``tail``'s
    constants (written as they are). A row is one f-string; then counting the text's tabs,
    line ends and backslashes (C scans) proves that no value held a tab, a line break or a
    backslash, the only characters the text form escapes. Rows that hold any are written again
    value by value, escaped."""
    end = "".join(f"\t{value}" for value in tail) + "\n"
    data = "".join(
        [
            f"{r[0]}\t{r[1]}\t{r[2]}\t{r[3]}\t{r[4]}\t{r[5]}\t{1 if r[6] else 0}\t{r[7]}\t{r[8]}\t"
            f"{r[9]}\t{_NULL if r[10] is None else r[10]}\t{_NULL if r[11] is None else r[11]}{end}"
            for r in rows
        ]
    ).encode()
    nulls = [r[10] for r in rows].count(None) + [r[11] for r in rows].count(None)
    if (
        data.count(b"\\") == nulls
        and data.count(b"\t") == (11 + len(tail)) * len(rows)
        and data.count(b"\n") == len(rows)
        and b"\r" not in data
    ):
        return data
    return "".join([_escaped(r, end) for r in rows]).encode()


def _escaped(row: JobRow, end: str) -> str:
    """One row of ``COPY`` text, every value escaped."""
    fields = [
        _NULL if v is None else v.translate(_ESCAPE) if isinstance(v, str) else str(int(v))
        for v in row
    ]
    return "\t".join(fields) + end


_TEXTS: dict[str, Any] = {}


def _text(sql: str) -> Any:
    """The ``text()`` of a fenced UPDATE, built once per statement shape."""
    found = _TEXTS.get(sql)
    if found is None:
        found = _TEXTS[sql] = text(sql)
    return found


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to the server is gone (or cannot be made now)."""
    if isinstance(exc, OSError):
        return True
    state = _sqlstate(exc)
    return state is not None and (state.startswith("08") or state in _GONE)


def _error(lost: bool) -> type[StoreUnavailable]:
    return StoreUnreachable if lost else StoreUnavailable


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of an asyncpg error (raw, or adapted by SQLAlchemy), else None."""
    for candidate in (exc, getattr(exc, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return state
    return None
