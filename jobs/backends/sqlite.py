"""The SQLite backend: a run folder's ``batcher.db``, one writer at a time.

Writes are short ``BEGIN IMMEDIATE`` transactions serialised by the store's lock, so a writer
never upgrades a read lock into a deadlock, and ``busy_timeout`` covers other processes. The
hot path's writes and the claim run as plain SQL on aiosqlite's database thread in one
hand-over each (a statement through SQLAlchemy costs several thread hand-overs). A claim is a
``SELECT`` then an ``UPDATE ... RETURNING`` in that one write transaction: safe because SQLite
has one writer. Import pulls the manifest's rows from its iterator on the database thread, in
multi-row ``INSERT``\\ s.
"""

from __future__ import annotations

import functools
import gc
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from itertools import chain, islice
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from .. import migrations, schema
from ..errors import JobStoreError, LeaseLost, StoreUnavailable
from ..spec import JobRow
from ..states import State
from ..version import SQLITE_VARIABLES_SQL
from . import fresh
from .base import CLAIM_COLUMNS, LEASED_ORDER, Backend, Clock, Op, Tally
from .fresh import FreshFile

__all__ = ["SQLiteBackend"]

# Rows an import INSERT statement takes: 1M rows go in about a third faster 64 a statement than
# one, and 6% faster again 256 a statement than 64 (3,073 parameters: SQLite builds before 3.32
# allow 999, and get fewer, see _rows_per_insert). A power of two, so that it divides the
# helper process's chunks (jobs.readahead.CHUNK).
ROWS_PER_INSERT = 256
IMPORT_CHUNK = 8 * ROWS_PER_INSERT  # rows taken between checks for a cancelled import
_COLS = ", ".join(schema.STAGING_COLUMNS)
_WIDTH = len(schema.STAGING_COLUMNS)  # values a row binds

# The claim's statements. The ACTIVE condition lets SQLite use the partial index; rowid keeps
# the manifest's order among equals.
_DUE = f"{schema.ACTIVE_SQL} AND next_attempt_at <= ? ORDER BY next_attempt_at, rowid LIMIT ?"
# One statement per leased state (generated: downloads first, then submitted: task polls):
# with ``state = ?`` the index gives the order (an IN list would sort in a temporary B-tree).
_CLAIM_LEASED = (
    "SELECT id FROM jobs WHERE state = ? AND "
    f"(lease_expires_at IS NULL OR lease_expires_at < ?) AND {_DUE}"
)
_CLAIM_PENDING = f"SELECT id FROM jobs WHERE state = '{State.PENDING.value}' AND {_DUE}"
_RETURNING = f"RETURNING {', '.join(CLAIM_COLUMNS)}"
_TAKE_LEASED = (
    "UPDATE jobs SET claim_token = ?, lease_expires_at = ?, worker = ? "
    f"WHERE id IN ({{marks}}) {_RETURNING}"
)
# ``+state``: the term is not one an index may serve. ``state = 'pending'`` implies the claim
# index's condition (an OR of states), so SQLite would otherwise take every pending job from
# that index (10,000 of a 1M table 99% done: 20-70 ms a claim) instead of the 64 ids by key.
_TAKE_PENDING = (
    f"UPDATE jobs SET state = '{State.RUNNING.value}', claim_token = ?, lease_expires_at = ?, "
    "worker = ?, started_at = coalesce(started_at, ?) "
    f"WHERE +state = '{State.PENDING.value}' AND id IN ({{marks}}) {_RETURNING}"
)
_IN_MAX = 500  # ids per IN (...): well under SQLite's limit on bound parameters

# Binding a value that is not exactly a str, int, float or bytes makes the sqlite3 module look
# for an adapter, and without one registered, Python 3.11's lookup formats an AttributeError
# and drops it for every such value (~1 us each). An import row binds a bool (prompt_extend)
# and one or two None: 1M short rows spent ~2 CPU s on it. Registered, the lookup is a dict
# hit and one C call; the values bound are the same (None as NULL, a bool as 0 or 1).
_NO_ADAPTATION: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NO_ADAPTATION.get)
sqlite3.register_adapter(bool, int)

# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF) and what they mean here.
_MESSAGES = {
    5: "the job database is locked by another process; is another batcher running here?",
    6: "the job database is locked by another process; is another batcher running here?",
    8: "the job database is read-only",
    11: "the job database is damaged or not a batcher database",
    13: "the disk is full: the job database could not be written",
    14: "the job database could not be opened: is its folder writable?",
    26: "the job database is damaged or not a batcher database",
}


class _ImportCancelled(Exception):
    """Raised on the database thread to end an import whose caller was cancelled."""


def _apply(db: sqlite3.Connection, ops: list[Op]) -> None:
    """Run ``ops`` on the database thread, in the caller's transaction: a fenced UPDATE must
    change exactly one row (else :class:`LeaseLost`); a ``sync`` function may raise a
    :class:`JobStoreError` that fails it alone. Any other error propagates (the batch fails)."""
    for o in ops:
        if o.sync is not None:
            try:
                o.result = o.sync(db)
            except JobStoreError as exc:
                o.error = exc
        elif db.execute(o.sql, o.params or {}).rowcount != 1:
            o.error = LeaseLost(o.lost)


@functools.lru_cache(maxsize=8)
def _insert(table: str, rows: int, stamped: bool) -> str:
    """``INSERT`` of ``rows`` rows of the import columns into ``table``, with numbered
    parameters; ``stamped``: each row also gets state ``pending`` and ``created_at = ?1``.

    ``OR FAIL``: a row breaking a constraint still fails the statement, and the import's
    transaction is rolled back whole, as before; but SQLite no longer has to be able to undo
    one statement's earlier rows alone (``ABORT``, the default), which it does by copying every
    page the statement changes into a statement journal first: for 1M rows, 440 MB written to
    a temporary file in 214,000 writes."""
    width = len(schema.STAGING_COLUMNS)
    first = 2 if stamped else 1
    tail = ", 'pending', ?1" if stamped else ""
    values = ", ".join(
        "(" + ", ".join(f"?{first + width * r + c}" for c in range(width)) + tail + ")"
        for r in range(rows)
    )
    columns = f"{_COLS}, state, created_at" if stamped else _COLS
    return f"INSERT OR FAIL INTO {table} ({columns}) VALUES {values}"


def _message(exc: BaseException) -> str:
    """What a SQLite error means to a user: by its result code, else its text."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and (code & 0xFF) in _MESSAGES:
        return _MESSAGES[code & 0xFF]
    return f"the job database failed: {str(exc) or type(exc).__name__}"


class SQLiteBackend(Backend):
    """A SQLite file (see the module docstring)."""

    order_column = "rowid"
    staging_order = "rowid"
    shared = False
    variables_sql = SQLITE_VARIABLES_SQL

    def __init__(self, path: Path, *, read_only: bool = False, stage: bool = False) -> None:
        self.path = path
        self.label = str(path)
        url = f"sqlite+aiosqlite:///{path}"
        if read_only:
            where = quote(os.path.abspath(path))
            url = f"sqlite+aiosqlite:///file:{where}?immutable=1&uri=true"
        # Three pooled connections (the hot path's writer, a writer, a reader; writes are
        # serialised by the store's lock): opening one costs a thread and the pragmas, far
        # too much per transaction. close() disposes the pool, so nothing lingers open.
        self.engine = create_async_engine(
            url,
            poolclass=AsyncAdaptedQueuePool,
            pool_size=3,
            max_overflow=0,
        )
        self.read_only = read_only
        self.stage = stage and not read_only
        # While the file is new and unpublished, its connections open the temporary file
        # (see jobs.backends.fresh); None once published, or for an existing file.
        self._fresh: FreshFile | None = None
        self._fresh_failed = False
        _install_hooks(self.engine.sync_engine, self)
        self._writer: AsyncConnection | None = None  # held for the hot path's batches
        self._writer_driver: Any = None

    async def prepare(self) -> None:
        """With ``stage``, a database that does not exist yet is made under a temporary name
        with no journal file and published whole by :meth:`settle` (see
        :mod:`jobs.backends.fresh`); a leftover temporary name beside an existing one is
        removed."""
        if self.read_only:
            return
        path = self.path
        if path.exists():
            fresh.remove_leftover(path)
        elif self.stage:
            self._fresh = await anyio.to_thread.run_sync(fresh.FreshFile.claim, path)

    @property
    def building(self) -> bool:
        """Whether the database is still its unpublished temporary file."""
        return self._fresh is not None

    async def settle(self) -> None:
        """Publish a new database (its first import committed): every connection to the
        temporary file closed, the file switched to WAL, fsynced and linked into place; the
        next connections open it there, as an existing database."""
        made = self._fresh
        if made is None:
            return
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        await self.engine.dispose()
        self._fresh = None
        try:
            await anyio.to_thread.run_sync(made.publish)
        except BaseException:
            self._fresh_failed = True  # no batcher.db: refuse to make an empty one
            raise

    @contextmanager
    def translated(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            raise StoreUnavailable(_message(exc.orig or exc)) from exc
        except sqlite3.Error as exc:  # the hot path's updates go to the driver directly
            raise StoreUnavailable(_message(exc)) from exc
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"the job database failed: {type(exc).__name__}") from exc

    def default_clock(self) -> Clock:
        return time.time

    async def before_migrating(self, version: int) -> None:
        await anyio.to_thread.run_sync(migrations.backup_before_migrating, self.path, version)

    async def after_create(self, conn: AsyncConnection) -> None:
        return None

    def staging_ddl(self) -> str:
        return schema.STAGING_DDL

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        with self.translated():
            async with self.engine.connect() as conn:
                conn = await conn.execution_options(batcher_read=True)  # a plain BEGIN
                yield conn

    async def close(self) -> None:
        if self._fresh is not None:  # closed before (or after a failed) first import
            with anyio.CancelScope(shield=True):
                await self.settle()
        if self._writer is not None:
            await self._writer.close()
            self._writer = None
        await self.engine.dispose()

    async def run_updates(self, conn: AsyncConnection, ops: list[Op]) -> None:
        """All of ``ops`` in one trip to the database thread, inside ``conn``'s transaction."""
        if not ops:
            return
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        # aiosqlite's Connection._execute runs a function on its own thread (private, but the
        # only way to run several statements in one hand-over; tests cover it on every upgrade).
        await driver._execute(_apply, driver._conn, ops)

    async def write_batch(self, ops: list[Op]) -> None:
        """BEGIN IMMEDIATE, the ops and COMMIT in one trip to the database thread, on a
        connection kept for it."""
        if self._writer is None:
            self._writer = await self.engine.connect()
            raw = await self._writer.get_raw_connection()
            self._writer_driver = raw.driver_connection
        driver = self._writer_driver
        assert driver is not None

        def work(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                _apply(db, ops)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

        await driver._execute(work, driver._conn)

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
        def op(db: sqlite3.Connection) -> list[tuple[Any, ...]]:
            gen_ids: list[str] = []
            for state in LEASED_ORDER:
                if len(gen_ids) < limit:
                    args = (state.value, now, now, limit - len(gen_ids))
                    gen_ids += [r[0] for r in db.execute(_CLAIM_LEASED, args)]
            pend_ids: list[str] = []
            if len(gen_ids) < limit:
                pend_ids = [r[0] for r in db.execute(_CLAIM_PENDING, (now, limit - len(gen_ids)))]
            rows: list[tuple[Any, ...]] = []
            taken = ((gen_ids, _TAKE_LEASED, ()), (pend_ids, _TAKE_PENDING, (now,)))
            for ids, sql, extra in taken:
                for at in range(0, len(ids), _IN_MAX):
                    part = ids[at : at + _IN_MAX]
                    rows += db.execute(
                        sql.format(marks=", ".join("?" * len(part))),
                        (token, lease, worker, *extra, *part),
                    )
            # RETURNING emits rows in no promised order: hand them out in the order chosen.
            rank = {job_id: n for n, job_id in enumerate([*gen_ids, *pend_ids])}
            rows.sort(key=lambda r: rank[r[0]])
            return rows

        result: list[tuple[Any, ...]] = await submit(Op(None, sync=op))
        return result

    async def stream_rows(
        self, conn: AsyncConnection, rows: Iterable[JobRow], table: str, now: float | None
    ) -> int:
        """One ``executemany`` of ``ROWS_PER_INSERT``-row statements pulls the rows from the
        iterator as SQLite inserts them, so the manifest is read and checked on the database
        thread too: one hand-over for the whole import instead of one per chunk. (A second
        thread would not overlap them anyway: the ``sqlite3`` module binds parameters holding
        the GIL. A big manifest is read by a helper process, which hands over each statement's
        rows as one flat tuple: see ``jobs.readahead``.) A ManifestInvalid raised by the
        iterator propagates out of ``executemany`` and rolls everything back. When this task
        is cancelled (Ctrl-C), the iterator stops at its next chunk, so the rollback does not
        wait for the whole manifest.
        """
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        width = _rows_per_insert(driver._conn)
        stop = threading.Event()
        total = 0
        self.loaded = None
        tally = Tally() if table == "jobs" else None  # a first import: see Backend.loaded
        head: list[Any] = [] if now is None else [now]  # created_at, bound once as ?1
        leftover: list[Any] = []  # the last rows' values, fewer than a statement takes
        flat = getattr(rows, "flat", None)

        def params() -> Iterator[list[Any]]:
            nonlocal total
            source = iter(rows)
            try:
                while chunk := list(islice(source, IMPORT_CHUNK)):
                    if stop.is_set():
                        raise _ImportCancelled
                    whole = len(chunk) - len(chunk) % width
                    total += whole  # the leftover is counted as it goes in
                    for i in range(0, whole, width):
                        values = [*head, *chain.from_iterable(chunk[i : i + width])]
                        if tally is not None:
                            tally.add(values[len(head) :], _WIDTH)
                        yield values
                    leftover.extend(chain.from_iterable(chunk[whole:]))  # only the last chunk
            finally:
                close = getattr(source, "close", None)
                if close is not None:  # a generator: stop it now (a helper process with it)
                    close()

        def grouped(groups: Iterator[tuple[Any, ...]]) -> Iterator[list[Any]]:
            """A helper process's flat groups of ``width`` rows (the last one maybe short)."""
            nonlocal total
            full = width * _WIDTH
            try:
                for n, group in enumerate(groups):
                    if not n % 32 and stop.is_set():
                        raise _ImportCancelled
                    if len(group) != full:
                        leftover.extend(group)  # the last group
                        continue
                    total += width
                    if tally is not None:
                        tally.add(group, _WIDTH)
                    yield [*head, *group]
            finally:
                close = getattr(groups, "close", None)
                if close is not None:
                    close()

        # No cyclic garbage collection while the rows go in: the load makes millions of
        # tuples and lists, none in a cycle, and each full collection they set off walks every
        # object of the process holding the GIL (py-spy of 1M short rows: 316 ms of the
        # importing process in gc_collect_main, 124 ms with this, the rest in its start-up).
        collecting = gc.isenabled()
        gc.disable()
        try:
            # aiosqlite runs executemany on its own thread and hands it the iterator as it is.
            stamped = now is not None
            statements = params() if flat is None else grouped(flat(width))
            cursor = await driver.executemany(_insert(table, width, stamped), statements)
            await cursor.close()
            if leftover:
                total += len(leftover) // _WIDTH
                last = (head + leftover[at : at + _WIDTH] for at in range(0, len(leftover), _WIDTH))
                cursor = await driver.executemany(_insert(table, 1, stamped), last)
                await cursor.close()
                if tally is not None:
                    tally.add(leftover, _WIDTH)
        except BaseException:
            stop.set()
            raise
        finally:
            if collecting:
                gc.enable()
        if tally is not None:
            self.loaded = tally.counts()
        return total


def _rows_per_insert(db: sqlite3.Connection) -> int:
    """Rows an import ``INSERT`` takes: ``ROWS_PER_INSERT``, or as many of the powers of two
    below it as this SQLite's limit on bound parameters allows (999 before 3.32)."""
    limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    rows = ROWS_PER_INSERT
    while rows > 1 and rows * _WIDTH + 1 > limit:
        rows //= 2
    return rows


def _install_hooks(sync_engine: Any, backend: SQLiteBackend) -> None:
    """Pragmas on every connection; BEGIN IMMEDIATE for writes, plain BEGIN for reads.

    A read-only database gets only the pragmas that write nothing (``journal_mode`` would).
    A new database's connections open its temporary file, with its own pragmas."""

    @event.listens_for(sync_engine, "do_connect")
    def _on_do_connect(_dialect: Any, _record: Any, cargs: list[Any], _cparams: Any) -> None:
        made = backend._fresh
        if made is not None:
            cargs[0] = os.path.abspath(made.temp)
        elif backend._fresh_failed:  # connecting would make an empty batcher.db
            raise StoreUnavailable(f"{backend.path} was not made: its first import failed")

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        for pragma in fresh.PRAGMAS if backend.building else schema.PRAGMAS:
            if backend.read_only and "journal_mode" in pragma:
                continue
            cur.execute(pragma)
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("batcher_read"):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
