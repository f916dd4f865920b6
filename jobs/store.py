"""JobStore: every read and write of a run folder's job table goes through here.

Theory of operation
-------------------
The table is the run's memory. A row is written when a manifest is imported and then only
moved through the transitions of :mod:`jobs.states`, each one an ``UPDATE ... WHERE id = ?
AND state IN (...) AND claim_token = ?``: the pure table says what may happen, the SQL says it
again, and a write that matches no row (the lease was lost to someone else, or the row moved
on) changes nothing and raises :class:`LeaseLost`.

Everything both databases share is here and in :mod:`jobs.merge`, in portable SQL; what
differs (the engine, the hot path's writes, claims, bulk loading, the manifest-order column,
error translation) is the backend's: :mod:`jobs.backends.sqlite` for a run folder's
``batcher.db``, :mod:`jobs.backends.postgres` for a table many workers share. Writes are short
transactions serialised in this process by one lock; no network call ever runs inside a
transaction: callers do their HTTP between writes.

Outages: a database server that cannot be reached (:class:`StoreUnreachable`: restarted,
the network cut) fails every command at once, unless its caller set :attr:`JobStore.outage`:
then a write, a claim or a run's read waits there and is tried again once the hook returns
True (the run pauses meanwhile: see ``batcher.pool``). A write is one transaction, so trying
it again is safe; one whose commit went through with its answer lost finds its row moved on
and is refused as a lost lease, never applied twice.

Leases: ``claim`` hands out rows with a fresh token and ``lease_expires_at``; ``heartbeat``
extends them. A process that dies leaves ``running`` rows whose lease runs out; ``reclaim``
puts them back to ``pending`` (no attempt charged: whether the call went out is unknown, and
the lost answer is the service's to count). A run that holds the run folder's lock may reclaim
every ``running`` row at start, since no live process can own them; on a shared table
(PostgreSQL) only expired leases are ever reclaimed.

Import is one transaction: rows go into a temporary staging table, conflicts are found with set
queries, and new rows are copied in (into an empty table, straight in); with ``withdraw``, the
manifest is the whole truth and jobs that left it are withdrawn (:mod:`jobs.merge`). A
manifest error anywhere rolls the whole import back. The backend loads the rows (SQLite on its
database thread, PostgreSQL by COPY); a big manifest is read and checked meanwhile by a helper
process (``jobs.readahead``), so the two use two cores. A store opened with ``stage`` on a SQLite
file that does not exist yet makes it under a temporary name without journal or fsync, and the
first import's end publishes it whole (:mod:`jobs.backends.fresh`).

A job of several images (``n > 1``) keeps them in ``job_images``: written in the transaction
that moves the job to ``generated`` (and bills every image that came), then each image's
sha256 before its file is renamed into place (:meth:`record_image_file`), as ``jobs.sha256``
is for a job of one image; the job is completed once every recorded image is in place. A
regeneration forgets the images with the rest of the result; a redo keeps them in the
history record. Readers (:meth:`iter_records`, :meth:`get`, ...) give such a job its
``images``.

Sending jobs back (``retry_failed``, ``redo``) is one mechanism: the chosen ids go into a
temporary ``requeue`` table, each old record is copied to ``job_history`` with the reason (and,
for a redo, where its image was kept), and one ``UPDATE ... WHERE state IN (...)`` moves them,
the allowed states taken from the transition table. A redo is all or nothing: one job that is
not done refuses the whole transaction. Review marks (``set_review``, ``set_note``) write only
the review columns in one short transaction and never move a job, so a review page and a run
can share the folder.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import anyio
from sqlalchemy import and_, case, delete, func, inspect, literal_column, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from . import migrations, schema
from .backends import Backend, Op, open_backend
from .errors import (
    IllegalTransition,
    JobStoreError,
    LeaseLost,
    SchemaMismatch,
    StoreUnavailable,
    StoreUnreachable,
    UnknownJob,
)
from .group import GroupCommit
from .merge import (
    MOVE,
    MOVED,
    RESULT_RESET,
    ImportReport,
    attach_images,
    drop_images,
    images_of,
    merge_staging,
)
from .quota import QuotaSchedule
from .schema import EMULATOR_ENDPOINT, history, images, jobs, lane_calls, meta
from .spec import JobRow, JobSpec
from .states import LEASED, State, check_transition, sources_of
from .version import MICROS, VARIABLES_KEY

__all__ = [
    "EMULATOR_ENDPOINT",
    "REVIEW_MARKS",
    "Claim",
    "Generated",
    "ImportReport",
    "JobImage",
    "JobStore",
    "LaneCalls",
    "Moved",
    "Redo",
    "Spend",
    "Stats",
    "StoredFile",
]

Clock = Callable[[], float]
Outage = Callable[[StoreUnreachable], Awaitable[bool]]
_T = TypeVar("_T")
_P = ParamSpec("_P")
# Built after a first import rather than row by row (1M rows: 0.6-0.8 s at the end, 1.9 s
# more in the inserts). ix_jobs_failed_code stays: no new row is failed, so it costs the
# inserts nothing, while building it again would read the whole table (0.1 s at 1M).
_DEFERRED_INDEXES = tuple(i for i in jobs.indexes if i.name == "ix_jobs_active")
_RESULT_RESET = RESULT_RESET
# A new image is not the one a person judged: its review mark goes with the old record.
_REVIEW_RESET: dict[str, Any] = {"review": None, "review_note": None, "reviewed_at": None}
REVIEW_MARKS = ("approved", "rejected")
_IN_MAX = 500  # ids per IN (...): well under every backend's limit on bound parameters
_REQUEUE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS requeue "
    "(id TEXT PRIMARY KEY, seed INTEGER, prompt TEXT, file TEXT)"
)
_Op = Op
_SET_META = text(
    "INSERT INTO meta (key, value) VALUES (:key, :value) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
_DONE_NAMES = (
    "id", "state", "output", "prompt", "seed", "size", "width", "height", "prompt_extend",
    "actual_prompt", "request_id", "sha256", "vars", "generated_at", "model", "n", "params",
    "review",
)  # fmt: skip
_DONE_COLUMNS = ", ".join(_DONE_NAMES)
# The summary of every job's variables (JobStore.variables) is kept in meta until an import
# changes them: at a million rows, working it out takes seconds.
_VARIABLES_KEY = VARIABLES_KEY
_FORGET_VARIABLES = f"DELETE FROM meta WHERE key = '{_VARIABLES_KEY}'"


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim:
    """A job handed to a worker, with the token every later write must carry."""

    id: str
    token: str
    state: State  # RUNNING: generate it; GENERATED: download it
    model: str
    prompt: str
    size: str
    seed: int
    prompt_extend: bool
    output: str
    attempts: int
    download_attempts: int
    request_id: str | None
    image_url: str | None
    url_expires_at: float | None
    width: int | None
    height: int | None
    sha256: str | None = None  # set once a verified file was written (see record_file)
    bytes: int | None = None
    regenerated: int = 0  # times its image was generated again after the URL died
    n: int = 1  # images the call makes
    params: str | None = None  # optional model parameters as JSON (jobs.params)
    task_id: str | None = None  # the service's task, once created (asynchronous models)
    task_submitted_at: float | None = None
    lane: str | None = None  # the lane that created its task (polled with that lane's key)


@dataclass(frozen=True, kw_only=True, slots=True)
class JobImage:
    """One image of a job of several (``n > 1``): its place in the service's answer
    (``index``, 1..n, which names its file: :func:`jobs.naming.image_output`), where to fetch
    it, and once its verified file is being put in place, ``sha256`` and ``bytes``."""

    index: int
    url: str
    url_expires_at: float | None = None
    actual_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    bytes: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Generated:
    """What a successful generation call returned, recorded before any download.

    A job of several images (``n > 1``) lists them in ``images`` (``image_url`` is the first
    one's); ``billed`` is the images the service billed (its ``usage.image_count``), and
    ``shortfall`` says which of the n did not come, when some did not."""

    request_id: str | None
    width: int | None
    height: int | None
    image_count: int | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    reasoning_tokens: int | None
    actual_prompt: str | None
    image_url: str
    url_expires_at: float | None
    latency_ms: float
    cost: Decimal
    currency: str
    endpoint: str | None = None  # EMULATOR_ENDPOINT, or the API base URL; never the key
    images: tuple[JobImage, ...] = ()
    billed: int = 1
    shortfall: str | None = None
    lane: str | None = None  # the lane (named key) that made it; never the key


@dataclass(frozen=True, kw_only=True, slots=True)
class LaneCalls:
    """What one lane's calls of one model did in one run (a row of ``lane_calls``).

    ``first_accepted_at`` / ``last_accepted_at``: Unix send times of the first and last call
    the service accepted; the lane's achieved rate is measured between them.
    """

    run: str
    lane: str
    model: str
    quota: float | None
    calls: int = 0
    accepted: int = 0
    throttled: int = 0
    first_accepted_at: float | None = None
    last_accepted_at: float | None = None
    images: int = 0
    cost: Decimal = Decimal(0)
    currency: str | None = None
    emulated: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredFile:
    """A verified image in its final place."""

    sha256: str
    bytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Redo:
    """One done job to make again: a new ``seed`` and ``prompt`` (None keeps the job's own),
    and ``file``, where its previous image was kept (relative to the run folder), recorded in
    the history with the old record."""

    id: str
    seed: int | None = None
    prompt: str | None = None
    file: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Spend:
    """What the images of one currency cost, spent for real or only emulated."""

    currency: str
    emulated: bool
    images: int
    amount: Decimal
    model: str = ""  # the model the images came from


@dataclass(frozen=True, kw_only=True, slots=True)
class Moved:
    """A done job's image still to be moved from ``old`` to its new output path ``new``."""

    seq: int  # the job_history row recording the move
    job_id: str
    old: str
    new: str
    n: int = 1  # a job of several images moves each of its files (``indexes``)
    indexes: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Stats:
    """Counts over the whole table. Money is per currency, and apart for the emulator's."""

    by_state: dict[str, int]
    errors_by_code: dict[str, int]
    spend: tuple[Spend, ...]
    attempts: int
    throttled: int
    ambiguous: int
    regenerated: int
    due_pending: int = 0
    # jobs per model and state (only with totals: it reads the whole table)
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)
    reviews: dict[str, int] = field(default_factory=dict)  # "approved" / "rejected" -> count
    # done jobs of several images that got fewer than n (a partial success), and the images
    # they lack (only with totals)
    short_jobs: int = 0
    images_short: int = 0
    lanes: tuple[LaneCalls, ...] = ()  # every run's calls per lane and model (with totals)

    @property
    def total(self) -> int:
        return sum(self.by_state.values())

    def count(self, state: State) -> int:
        return self.by_state.get(state.value, 0)

    @property
    def images_billed(self) -> int:
        """Images the service billed (the emulator's are not)."""
        return sum(s.images for s in self.spend if not s.emulated)

    @property
    def images_emulated(self) -> int:
        """Images the emulator made."""
        return sum(s.images for s in self.spend if s.emulated)

    def spent(self, *, emulated: bool = False) -> dict[str, Decimal]:
        """Amounts per currency: spent for real, or (``emulated``) only emulated."""
        out: dict[str, Decimal] = {}
        for s in self.spend:
            if s.emulated == emulated:
                out[s.currency] = out.get(s.currency, Decimal(0)) + s.amount
        return dict(sorted(out.items()))

    @property
    def currency(self) -> str | None:
        """The one currency of every amount (real or emulated); None with none or several."""
        found = {s.currency for s in self.spend}
        return found.pop() if len(found) == 1 else None

    @property
    def cost(self) -> Decimal:
        """The total of every amount, real and emulated, when they share one currency.

        Raises ``ValueError`` when they do not: amounts in two currencies are never summed.
        """
        if len({s.currency for s in self.spend}) > 1:
            raise ValueError("amounts in several currencies: read Stats.spent() per currency")
        return sum((s.amount for s in self.spend), Decimal(0))


def _rides_out(
    method: Callable[Concatenate[JobStore, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[JobStore, _P], Coroutine[Any, Any, _T]]:
    """A read or a one-transaction write that waits out an outage (see :attr:`JobStore.outage`)."""

    @functools.wraps(method)
    async def wrapper(self: JobStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        while True:
            try:
                return await method(self, *args, **kwargs)
            except StoreUnreachable as exc:
                if not await self._wait_out(exc):
                    raise

    return wrapper


class _Add(int):
    """In a transition's values: add this to the column rather than set it."""


@functools.lru_cache(maxsize=64)
def _held(job_id: str, token: str, *states: State) -> ColumnElement[bool]:
    """The row of ``job_id`` while ``token`` holds it in one of ``states``: the fence of every
    write a claim's holder makes."""
    return (
        (jobs.c.id == job_id)
        & (jobs.c.claim_token == token)
        & jobs.c.state.in_([s.value for s in states])
    )


def _fenced_update(dst: str, allowed: tuple[str, ...], shape: tuple[tuple[str, bool], ...]) -> str:
    """``UPDATE jobs SET ... WHERE id = ? AND claim_token = ? AND state IN (...)``, by name."""
    valid = set(jobs.c.keys())
    sets = [f"state = '{dst}'"]
    for col, add in shape:
        if col not in valid:
            raise ValueError(f"no column {col!r}")
        sets.append(f"{col} = {col} + :v_{col}" if add else f"{col} = :v_{col}")
    states = ", ".join(f"'{s}'" for s in allowed)
    return (
        f"UPDATE jobs SET {', '.join(sets)} "
        f"WHERE id = :job_id AND claim_token = :token AND state IN ({states})"
    )


def _fenced_op(
    job_id: str, token: str, dst: State, values: dict[str, Any], *, src: set[State]
) -> _Op:
    """One fenced move: applied only if ``token`` still holds the job in an allowed state.

    ``values`` maps columns to new values; an :class:`_Add` adds to the column instead.
    The statement is plain SQL cached per shape: on the hot path, building and caching
    a Core statement per call cost more than the write itself.
    """
    allowed = tuple(sorted(s.value for s in sources_of(dst) & src))
    shape = tuple((col, isinstance(v, _Add)) for col, v in values.items())
    sql = _fenced_update(dst.value, allowed, shape)
    params = {f"v_{col}": (int(v) if isinstance(v, _Add) else v) for col, v in values.items()}
    params.update(job_id=job_id, token=token)
    lost = f"job {job_id!r}: lease lost, the write to {dst} was not applied"
    return _Op(None, sql=sql, params=params, lost=lost)


def _record_file_op(job_id: str, token: str, stored: StoredFile) -> _Op:
    return _fenced_op(
        job_id,
        token,
        State.GENERATED,
        {"sha256": stored.sha256, "bytes": stored.bytes},
        src={State.GENERATED},
    )


def _complete_op(job_id: str, token: str, stored: StoredFile, now: float) -> _Op:
    return _fenced_op(
        job_id,
        token,
        State.DONE,
        {
            "sha256": stored.sha256,
            "bytes": stored.bytes,
            "finished_at": now,
            "lease_expires_at": None,
            "claim_token": None,
            "error_code": None,
            "error_message": None,
        },
        src={State.GENERATED},
    )


async def _apply_fenced(conn: AsyncConnection, op: _Op) -> None:
    """Run a fenced move inside ``conn``'s transaction (beside other writes of one step);
    raise :class:`LeaseLost` when it matched no row."""
    result = await conn.execute(text(op.sql), op.params or {})
    if result.rowcount != 1:
        raise LeaseLost(op.lost)


def _claim_from_row(row: tuple[Any, ...], token: str) -> Claim:
    """A Claim from a row of ``_CLAIM_COLUMNS``."""
    (
        job_id,
        state,
        model,
        prompt,
        size,
        seed,
        prompt_extend,
        output,
        attempts,
        download_attempts,
        request_id,
        image_url,
        url_expires_at,
        width,
        height,
        sha256,
        size_bytes,
        regenerated,
        n,
        params,
        task_id,
        task_submitted_at,
        lane,
    ) = row
    return Claim(
        id=job_id,
        token=token,
        state=State(state),
        model=model,
        prompt=prompt,
        size=size,
        seed=seed,
        prompt_extend=bool(prompt_extend),
        output=output,
        attempts=attempts,
        download_attempts=download_attempts,
        request_id=request_id,
        image_url=image_url,
        url_expires_at=url_expires_at,
        width=width,
        height=height,
        sha256=sha256,
        bytes=size_bytes,
        regenerated=regenerated,
        n=n,
        params=params,
        task_id=task_id,
        task_submitted_at=task_submitted_at,
        lane=lane,
    )


class JobStore:
    """The durable job table of one run folder.

    >>> async with await JobStore.open("out/catalog/batcher.db") as store:  # doctest: +SKIP
    ...     manifest = open_manifest("catalog.yaml", rules=RULES)
    ...     report = await store.import_rows(manifest.rows(), source="catalog.yaml")
    ...     claims = await store.claim(limit=4, lease_seconds=60)
    """

    def __init__(self, backend: Backend, clock: Clock) -> None:
        self._backend = backend
        self._engine = backend.engine
        self.clock = clock
        self._lock = anyio.Lock()  # every write transaction, grouped or not, holds it
        self._group = GroupCommit(self._run_batch, lock=self._lock)
        self.outage: Outage | None = None
        """Called when the database server cannot be reached, by the write, claim or read that
        failed: it returns True once the server may be back (the operation is tried again),
        False to give up (the error is raised). None: give up at once."""

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        create: bool = True,
        read_only: bool = False,
        stage: bool = False,
        clock: Clock | None = None,
    ) -> Self:
        """Open (and with ``create``, make) the job table at ``path``: a SQLite file, or a
        ``postgresql://user@host/name`` URL naming a database that holds one run.

        ``read_only``: for a finished run folder that cannot be written (read-only media, an
        archive): the file is opened immutable, nothing is migrated and every write fails.
        Only for a folder no process writes to (SQLite then trusts the file not to change).
        A PostgreSQL table is only checked, not migrated. ``clock`` defaults to this host's
        clock for SQLite, and to the database server's clock for PostgreSQL (leases shared
        by hosts are measured on one clock).

        ``stage`` (for a command that imports a manifest at once): a SQLite file that does not
        exist yet is made under a temporary name beside it, with no journal and no fsync, and
        appears at ``path``, whole and fsynced, when the first import has committed (or the
        store closes first); a process killed before leaves no ``path`` (see
        :mod:`jobs.backends.fresh`). Meanwhile another process creating the same file waits
        for this one, up to the busy timeout.
        """
        backend = open_backend(path, read_only=read_only, stage=stage)
        db = getattr(backend, "path", None)
        if isinstance(db, Path):
            if (read_only or not create) and not db.exists():
                raise StoreUnavailable(f"no job database at {db}")
            if not read_only:
                try:
                    db.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreUnavailable(f"cannot create {db.parent}: {exc.strerror}") from exc
        try:
            await backend.prepare()
            store = cls(backend, clock or backend.default_clock())
            if not create and db is None and await store._schema_version() is None:
                raise StoreUnavailable(
                    f"no job database in {backend.label}: it holds no batcher tables"
                )
            if read_only:
                await store._check_schema_read_only()
            else:
                await store._ensure_schema()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await backend.close()
            raise
        return store

    async def close(self) -> None:
        await self._backend.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def path(self) -> Path:
        """The SQLite file (a PostgreSQL store has none: see :attr:`location`)."""
        db = getattr(self._backend, "path", None)
        if not isinstance(db, Path):
            raise AttributeError("a PostgreSQL job table has no file path")
        return db

    @property
    def location(self) -> str:
        """Where the table is, for messages: the file, or the URL without its password."""
        return self._backend.label

    @property
    def shared(self) -> bool:
        """Whether other processes may work on this table at once (PostgreSQL): a run must
        then never reclaim jobs whose lease has not expired."""
        return self._backend.shared

    def quota_schedule(self, *, lane: str, model: str) -> QuotaSchedule | None:
        """The send schedule of ``model`` on ``lane`` (an account) that every worker of this
        table keeps to together (see :mod:`jobs.quota`); None for a SQLite run folder, which
        one process works and paces alone."""
        if not self.shared:
            return None
        return QuotaSchedule(self._backend, lane=lane, model=model)

    async def _ensure_schema(self) -> None:
        """Create the tables, or bring an older database up to this schema (a SQLite file is
        copied aside first; then every step in one transaction; see :mod:`jobs.migrations`)."""
        found = await self._schema_version()
        if found is not None and found < schema.SCHEMA_VERSION:
            await self._backend.before_migrating(found)
        async with self._write() as conn:
            found = await _read_version(conn)  # again, under the write lock
            if found is not None and found > schema.SCHEMA_VERSION:
                raise SchemaMismatch(
                    f"{self._backend.label} has schema version {found}, made by a newer "
                    f"batcher; this one knows versions up to {schema.SCHEMA_VERSION}: "
                    "upgrade batcher"
                )
            if found is not None:
                for _number, step in migrations.steps_after(found, schema.SCHEMA_VERSION):
                    for statement in migrations.statements_for(step, conn.dialect.name):
                        await conn.exec_driver_sql(statement)
            await conn.run_sync(schema.metadata.create_all)
            if found is None:
                await self._backend.after_create(conn)
                await conn.execute(
                    meta.insert().values(key="schema_version", value=str(schema.SCHEMA_VERSION))
                )
            elif found != schema.SCHEMA_VERSION:
                await conn.execute(
                    update(meta)
                    .where(meta.c.key == "schema_version")
                    .values(value=str(schema.SCHEMA_VERSION))
                )

    async def _check_schema_read_only(self) -> None:
        """A database opened read-only is used as it is: one of another schema is refused."""
        found = await self._schema_version()
        if found is None:
            raise StoreUnavailable(f"{self._backend.label} is not a batcher job database")
        if found != schema.SCHEMA_VERSION:
            newer = found > schema.SCHEMA_VERSION
            raise SchemaMismatch(
                f"{self._backend.label} has schema version {found} and this batcher reads version "
                f"{schema.SCHEMA_VERSION}; "
                + (
                    "upgrade batcher"
                    if newer
                    else "the folder is read-only, so it cannot be upgraded: copy the run "
                    "folder somewhere writable and run the command there"
                )
            )

    async def _schema_version(self) -> int | None:
        async with self._read() as conn:
            return await _read_version(conn)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """An exclusive write transaction (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: under
        the store's advisory lock)."""
        async with self._lock:
            with self._backend.translated():
                async with self._engine.begin() as conn:
                    await self._backend.exclusive(conn)
                    yield conn

    async def _batched(self, fn: Callable[[AsyncConnection], Awaitable[_T]]) -> _T:
        """Run ``fn`` in the next group commit (see :meth:`_submit`)."""
        result: _T = await self._submit(_Op(fn))
        return result

    async def _submit(self, op: _Op) -> Any:
        """Run one operation in the next group commit; raise its error, or return its result."""
        await self._submit_all([op])
        if op.error is not None:
            raise op.error
        return op.result

    async def _wait_out(self, exc: StoreUnreachable) -> bool:
        return self.outage is not None and await self.outage(exc)

    async def ping(self) -> None:
        """One round trip to the database (raises :class:`StoreUnreachable` while it cannot
        be reached); never waits out an outage."""
        async with self._read() as conn:
            await conn.execute(text("SELECT 1"))

    async def _submit_all(self, ops: list[_Op]) -> None:
        """Run ``ops`` in a write transaction shared with whatever else is queued (group commit).

        The leader (see :mod:`jobs.group`) runs every queued operation in one transaction, so
        concurrent workers share one commit (one fsync). An operation that raises
        :class:`JobStoreError` (a lost lease: its UPDATE matched nothing) fails alone; a
        database error fails the whole batch. Each op's outcome is left in its ``error`` and
        ``result``.

        A batch that failed because the server could not be reached is submitted again once
        :attr:`outage` says so (the transaction was rolled back, or its commit's answer lost:
        then each fenced write finds its row moved on and is refused).
        """
        while True:
            await self._group.submit(ops)
            lost = next((o.error for o in ops if isinstance(o.error, StoreUnreachable)), None)
            if lost is None or not await self._wait_out(lost):
                return
            for o in ops:
                o.taken = o.done = False
                o.error = o.result = None

    async def _run_batch(self, batch: list[_Op]) -> None:
        backend = self._backend
        try:
            with backend.translated():
                if all(o.fn is None for o in batch):
                    await backend.write_batch(batch)  # the hot path
                    return
                async with self._engine.begin() as conn:
                    plain: list[_Op] = []
                    for o in batch:
                        if o.fn is None:
                            plain.append(o)
                            continue
                        await backend.run_updates(conn, plain)
                        plain = []
                        try:
                            o.result = await o.fn(conn)
                        except JobStoreError as exc:  # wrote nothing: the others go on
                            o.error = exc
                    await backend.run_updates(conn, plain)
        except Exception as exc:
            for o in batch:
                o.error = o.error or exc
        finally:
            for o in batch:
                o.done = True

    def _read(self) -> Any:
        """A connection for reads (an async context manager)."""
        return self._backend.read()

    # -------------------------------------------------------------------- import

    async def import_specs(
        self,
        specs: Iterable[JobSpec],
        *,
        source: str,
        replace: bool = False,
        withdraw: bool = False,
        max_errors: int = 20,
    ) -> ImportReport:
        """Import every spec in one transaction; nothing is written if anything is wrong.

        Rows already present with the same content are left alone. A row whose id exists with
        different content is an error naming the id, unless ``replace`` is set: then the job
        goes back to ``pending`` and its old record is kept in ``job_history``.
        """
        return await self.import_rows(
            (spec.row() for spec in specs),
            source=source,
            replace=replace,
            withdraw=withdraw,
            max_errors=max_errors,
        )

    async def import_rows(
        self,
        rows: Iterable[JobRow],
        *,
        source: str,
        replace: bool = False,
        withdraw: bool = False,
        max_errors: int = 20,
    ) -> ImportReport:
        """:meth:`import_specs` for jobs as ``JobRow`` tuples, the cheaper form a big
        manifest streams (``Manifest.rows()``).

        With ``withdraw`` the rows are the whole manifest: jobs not among them are withdrawn,
        withdrawn ones among them come back (see :mod:`jobs.merge`). A job whose only change is
        its output path moves there, keeping its state (a done one's file move is left to the
        caller: :meth:`pending_moves`)."""
        now = self.clock()
        async with self._write() as conn:
            first = (await conn.exec_driver_sql("SELECT NOT EXISTS (SELECT 1 FROM jobs)")).scalar()
            if not first:
                await conn.exec_driver_sql(self._backend.staging_ddl())
                await conn.exec_driver_sql("DELETE FROM staging")
                total = await self._backend.stream_rows(conn, rows, "staging", None)
                report = await merge_staging(
                    conn,
                    source=source,
                    replace=replace,
                    withdraw=withdraw,
                    max_errors=max_errors,
                    total=total,
                    now=now,
                    order=self._backend.staging_order,
                )
                if report.added or report.replaced or report.updated or report.restored:
                    await conn.exec_driver_sql(_FORGET_VARIABLES)
                await conn.exec_driver_sql("DELETE FROM staging")
                return report
            # The first import goes straight into the table: the manifest has already refused
            # duplicate ids and outputs, and the constraints would catch any. The active-jobs
            # index is built once at the end (a sort), not row by row.
            backend_indexes = self._backend.deferred_indexes
            for name in [i.name for i in _DEFERRED_INDEXES] + [n for n, _ in backend_indexes]:
                await conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
            await self._backend.before_bulk_load(conn)
            total = await self._backend.stream_rows(conn, rows, "jobs", now)
            for index in _DEFERRED_INDEXES:
                await conn.run_sync(index.create)
            for _, ddl in backend_indexes:
                await conn.exec_driver_sql(ddl)
            await conn.exec_driver_sql(_FORGET_VARIABLES)
            # The table is now these rows and nothing else (all pending, due, unbilled): the
            # backend's counts of them, when it kept some that add up, say so.
            fresh = self._backend.loaded
            if fresh is not None and sum(n for n, _ in fresh.values()) != total:
                fresh = None
        # A new SQLite file, made under a temporary name with no journal, is published now.
        async with self._lock:
            with self._backend.translated():
                await self._backend.settle()
        return ImportReport(total=total, added=total, unchanged=0, replaced=0, fresh=fresh)

    # --------------------------------------------------------------------- claims

    @_rides_out
    async def claim(self, *, limit: int, lease_seconds: float, worker: str = "") -> list[Claim]:
        """Lease up to ``limit`` due jobs: generated and submitted ones (download, or poll the
        task) first, then pending.

        Pending jobs move to ``running``; the others stay as they are under the lease.
        """
        if limit <= 0:
            return []
        now = self.clock()
        token = uuid.uuid4().hex
        rows = await self._backend.claim(
            self._submit,
            limit=limit,
            now=now,
            lease=now + lease_seconds,
            token=token,
            worker=worker,
        )
        return [_claim_from_row(r, token) for r in rows]

    async def heartbeat(self, token: str, ids: Iterable[str], *, lease_seconds: float) -> set[str]:
        """Extend the lease of ``ids`` held under ``token``; return the ids no longer held."""
        wanted = set(ids)
        if not wanted:
            return set()
        lease = self.clock() + lease_seconds

        async def op(conn: AsyncConnection) -> set[str]:
            held = (
                await conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_(wanted),
                        jobs.c.claim_token == token,
                        jobs.c.state.in_([State.RUNNING.value, *(s.value for s in LEASED)]),
                    )
                    .values(lease_expires_at=lease)
                    .returning(jobs.c.id)
                )
            ).scalars()
            return wanted - set(held)

        return await self._batched(op)

    async def _transition(
        self, job_id: str, token: str, dst: State, values: dict[str, Any], *, src: set[State]
    ) -> None:
        """One fenced move: applied only if ``token`` still holds the job in an allowed state."""
        await self._submit(_fenced_op(job_id, token, dst, values, src=src))

    async def _transitions(self, ops: list[_Op]) -> list[JobStoreError | None]:
        """Several fenced moves in one group commit; each one's error (or None) in order.

        A database error (:class:`StoreUnavailable`) is raised: it fails them all alike.
        """
        await self._submit_all(ops)
        for o in ops:
            if isinstance(o.error, StoreUnavailable) or not isinstance(
                o.error, JobStoreError | None
            ):
                raise o.error
        return [o.error if isinstance(o.error, JobStoreError) else None for o in ops]

    # ------------------------------------------------------------------ outcomes

    async def record_generated(
        self, job_id: str, token: str, gen: Generated, *, lease_seconds: float
    ) -> None:
        """``running -> generated``: the API answered; the download may start.

        The images of a job of several are recorded in the same transaction (any recorded
        before, of an earlier generation, are replaced)."""
        now = self.clock()
        fenced = _fenced_op(
            job_id,
            token,
            State.GENERATED,
            {
                "request_id": gen.request_id,
                "width": gen.width,
                "height": gen.height,
                "image_count": gen.image_count,
                "input_tokens": gen.input_tokens,
                "output_tokens": gen.output_tokens,
                "total_tokens": gen.total_tokens,
                "reasoning_tokens": gen.reasoning_tokens,
                "actual_prompt": gen.actual_prompt,
                "image_url": gen.image_url,
                "url_expires_at": gen.url_expires_at,
                "latency_ms": gen.latency_ms,
                "attempts": _Add(1),
                "billed": _Add(gen.billed),
                "cost_micros": _Add(int(gen.cost * MICROS)),
                "currency": gen.currency,
                "endpoint": gen.endpoint,
                "lane": gen.lane,
                "generated_at": now,
                "lease_expires_at": now + lease_seconds,
                "download_attempts": 0,
                "sha256": None,  # a new image: no file of it yet
                "bytes": None,
                "error_code": None,
                "error_message": None,
                "shortfall": gen.shortfall,
            },
            src={State.RUNNING, State.SUBMITTED},
        )
        if not gen.images:
            await self._submit(fenced)
            return
        rows = [
            {
                "job_id": job_id,
                "idx": image.index,
                "url": image.url,
                "url_expires_at": image.url_expires_at,
                "actual_prompt": image.actual_prompt,
                "width": image.width,
                "height": image.height,
            }
            for image in gen.images
        ]

        async def op(conn: AsyncConnection) -> None:
            await _apply_fenced(conn, fenced)
            await conn.execute(delete(images).where(images.c.job_id == job_id))
            await conn.execute(images.insert(), rows)

        await self._batched(op)

    async def job_images(self, job_id: str) -> list[JobImage]:
        """The images recorded for a job of several, in order (none for a job of one)."""
        async with self._read() as conn:
            rows = await conn.execute(
                select(images).where(images.c.job_id == job_id).order_by(images.c.idx)
            )
            return [
                JobImage(
                    index=r.idx,
                    url=r.url,
                    url_expires_at=r.url_expires_at,
                    actual_prompt=r.actual_prompt,
                    width=r.width,
                    height=r.height,
                    sha256=r.sha256,
                    bytes=r.bytes,
                )
                for r in rows
            ]

    async def record_image_file(
        self, job_id: str, token: str, index: int, stored: StoredFile
    ) -> None:
        """:meth:`record_file` for image ``index`` of a job of several: its hash is durable
        before its file is renamed into place. Raises :class:`LeaseLost` unless ``token``
        still holds the job, generated."""
        held = select(jobs.c.id).where(_held(job_id, token, State.GENERATED)).exists()

        async def op(conn: AsyncConnection) -> None:
            result = await conn.execute(
                update(images)
                .where(images.c.job_id == job_id, images.c.idx == index, held)
                .values(sha256=stored.sha256, bytes=stored.bytes)
            )
            if result.rowcount != 1:
                raise LeaseLost(f"job {job_id!r}: lease lost, image {index} was not recorded")

        await self._batched(op)

    async def done_images(self) -> int:
        """Image files the done jobs have: one a job of one image, the recorded ones of a job
        of several (``metadata.jsonl`` has a line for each)."""
        async with self._read() as conn:
            single = await conn.execute(
                select(func.count())
                .select_from(jobs)
                .where(jobs.c.state == State.DONE.value, jobs.c.n <= 1)
            )
            several = await conn.execute(
                select(func.count())
                .select_from(images.join(jobs, jobs.c.id == images.c.job_id))
                .where(jobs.c.state == State.DONE.value, jobs.c.n > 1, images.c.sha256.is_not(None))
            )
            return int(single.scalar_one()) + int(several.scalar_one())

    async def mark_creating(self, job_id: str, token: str) -> None:
        """Note that a task create is about to be sent (``task_id`` = ``""``), so a crash
        before its answer is committed is counted as ambiguous by :meth:`reclaim`."""

        async def op(conn: AsyncConnection) -> None:
            result = await conn.execute(
                update(jobs).where(_held(job_id, token, State.RUNNING)).values(task_id="")
            )
            if result.rowcount != 1:
                raise LeaseLost(f"job {job_id!r}: lease lost before its task was created")

        await self._batched(op)

    async def record_submitted(
        self,
        job_id: str,
        token: str,
        *,
        task_id: str,
        request_id: str | None,
        lease_seconds: float,
        lane: str | None = None,
    ) -> None:
        """``running -> submitted``: the service created the task; its id is kept until the
        task ends, whatever happens to this process, with the ``lane`` that created it (a task
        is the account's: it is polled with that lane's key)."""
        now = self.clock()
        await self._transition(
            job_id,
            token,
            State.SUBMITTED,
            {
                "task_id": task_id,
                "task_submitted_at": now,
                "lane": lane,
                "request_id": request_id,
                "lease_expires_at": now + lease_seconds,
                "error_code": None,
                "error_message": None,
            },
            src={State.RUNNING},
        )

    async def poll_later(
        self, job_id: str, token: str, *, delay: float, code: str, message: str
    ) -> None:
        """``submitted -> submitted``: polls keep failing; the task is polled again later
        (by this run or the next), its id kept."""
        await self._transition(
            job_id,
            token,
            State.SUBMITTED,
            {
                "next_attempt_at": self.clock() + max(0.0, delay),
                "error_code": code,
                "error_message": message,
                "lease_expires_at": None,
                "claim_token": None,
            },
            src={State.SUBMITTED},
        )

    async def submitted_tasks(self) -> list[tuple[str, str, str]]:
        """(job id, task id, model) of every job whose task was created and has not ended."""
        async with self._read() as conn:
            rows = await conn.execute(
                select(jobs.c.id, jobs.c.task_id, jobs.c.model).where(
                    schema.ACTIVE,
                    jobs.c.state == State.SUBMITTED.value,
                    jobs.c.task_id.is_not(None),
                    jobs.c.task_id != "",
                )
            )
            return [(str(a), str(b), str(c)) for a, b, c in rows]

    async def cancel_submitted(self, job_id: str, *, code: str, message: str) -> bool:
        """``submitted -> failed`` for a task cancelled at the service (``batcher cancel``,
        which holds the run folder's lock: no worker holds the job). Whether it applied."""
        check_transition(State.SUBMITTED, State.FAILED)
        async with self._write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.state == State.SUBMITTED.value,
                )
                .values(
                    state=State.FAILED.value,
                    error_code=code,
                    error_message=message,
                    finished_at=self.clock(),
                    lease_expires_at=None,
                    claim_token=None,
                )
            )
            return bool(result.rowcount == 1)

    async def record_file(self, job_id: str, token: str, stored: StoredFile) -> None:
        """Note the verified file's hash *before* it is renamed into place.

        If the process dies between the rename and :meth:`complete`, the next run finds the
        file with this hash at the output path and completes the job without downloading it
        again.
        """
        await self._submit(_record_file_op(job_id, token, stored))

    async def record_files(
        self, files: Sequence[tuple[str, str, StoredFile]]
    ) -> list[JobStoreError | None]:
        """:meth:`record_file` for several ``(job_id, token, stored)`` in one group commit.

        Returns each one's error (:class:`LeaseLost`) or None, in order; a database error is
        raised for all.
        """
        return await self._transitions([_record_file_op(*f) for f in files])

    async def complete(self, job_id: str, token: str, stored: StoredFile) -> None:
        """``generated -> done``: the file is verified and in place."""
        await self._submit(_complete_op(job_id, token, stored, self.clock()))

    async def complete_all(
        self, files: Sequence[tuple[str, str, StoredFile]]
    ) -> list[JobStoreError | None]:
        """:meth:`complete` for several ``(job_id, token, stored)`` in one group commit; each
        one's error or None, as :meth:`record_files`."""
        now = self.clock()
        return await self._transitions([_complete_op(*f, now) for f in files])

    async def retry_later(
        self,
        job_id: str,
        token: str,
        *,
        delay: float,
        code: str | None,
        message: str | None,
        request_id: str | None = None,
        charge_attempt: bool = True,
        throttled: bool = False,
        ambiguous: bool = False,
    ) -> None:
        """``running -> pending`` after a transient error, due again in ``delay`` seconds."""
        await self._transition(
            job_id,
            token,
            State.PENDING,
            {
                "next_attempt_at": self.clock() + max(0.0, delay),
                "attempts": _Add(int(charge_attempt)),
                "throttled": _Add(int(throttled)),
                "ambiguous": _Add(int(ambiguous)),
                "error_code": code,
                "error_message": message,
                "request_id": request_id,
                "lease_expires_at": None,
                "claim_token": None,
                "task_id": None,
            },
            src={State.RUNNING, State.SUBMITTED},
        )

    async def retry_download_later(
        self, job_id: str, token: str, *, delay: float, code: str, message: str
    ) -> None:
        """``generated -> generated``: the download failed; only the download is retried."""
        await self._transition(
            job_id,
            token,
            State.GENERATED,
            {
                "next_attempt_at": self.clock() + max(0.0, delay),
                "download_attempts": _Add(1),
                "error_code": code,
                "error_message": message,
                "lease_expires_at": None,
                "claim_token": None,
            },
            src={State.GENERATED},
        )

    async def regenerate(self, job_id: str, token: str, *, code: str, message: str) -> None:
        """``generated -> pending``: the image URL expired before the file was saved; or
        ``submitted -> pending``: the service no longer knows the task (expired, UNKNOWN).
        Either way the image is generated (and paid) again; counted in ``regenerated``; the
        images recorded of a job of several are forgotten with the rest of the result."""
        fenced = _fenced_op(
            job_id,
            token,
            State.PENDING,
            {
                **_RESULT_RESET,
                "regenerated": _Add(1),
                "download_attempts": 0,
                "next_attempt_at": self.clock(),
                "error_code": code,
                "error_message": message,
                "lease_expires_at": None,
                "claim_token": None,
                "task_id": None,
            },
            src={State.GENERATED, State.SUBMITTED},
        )

        async def op(conn: AsyncConnection) -> None:
            await _apply_fenced(conn, fenced)
            await drop_images(conn, [job_id])

        await self._batched(op)

    async def fail(
        self,
        job_id: str,
        token: str,
        *,
        code: str,
        message: str,
        request_id: str | None = None,
        charge_attempt: bool = True,
        ambiguous: bool = False,
    ) -> None:
        """``running|generated -> failed``: permanent error or attempts exhausted.

        ``ambiguous`` counts a last attempt whose answer was lost (it may have been billed).
        """
        values: dict[str, Any] = {
            "error_code": code,
            "error_message": message,
            "finished_at": self.clock(),
            "attempts": _Add(int(charge_attempt)),
            "ambiguous": _Add(int(ambiguous)),
            "lease_expires_at": None,
            "claim_token": None,
        }
        if request_id is not None:
            values["request_id"] = request_id
        await self._transition(
            job_id,
            token,
            State.FAILED,
            values,
            src={State.RUNNING, State.GENERATED, State.SUBMITTED},
        )

    async def release(self, job_id: str, token: str, *, ambiguous: bool = False) -> None:
        """Give a job back without charging an attempt (a run-level stop or shutdown).

        ``ambiguous``: a call was cut short after it was sent, so it may have been billed.
        """

        async def op(conn: AsyncConnection) -> None:
            result = await conn.execute(
                update(jobs)
                .where(_held(job_id, token, State.RUNNING, *LEASED))
                .values(
                    state=case(
                        (jobs.c.state == State.RUNNING.value, State.PENDING.value),
                        else_=jobs.c.state,
                    ),
                    # a create cut short after it was sent is ambiguous like any other call
                    task_id=case((jobs.c.task_id == "", None), else_=jobs.c.task_id),
                    ambiguous=jobs.c.ambiguous + int(ambiguous),
                    lease_expires_at=None,
                    claim_token=None,
                )
            )
            if result.rowcount != 1:
                raise LeaseLost(f"job {job_id!r}: lease lost, the release was not applied")

        return await self._batched(op)

    async def note_lost_answers(self, sent: Iterable[tuple[str, str]]) -> int:
        """Count one ambiguous call for each ``(job id, claim token)`` of a dead run's calls
        (``batcher.sendlog``) whose job is still ``running`` under that token: its call was
        sent and its answer never recorded, so it may have been billed. Call it before
        :meth:`reclaim` clears the tokens. Returns how many were counted."""
        n = 0
        async with self._write() as conn:
            for job_id, token in sent:
                result = await conn.execute(
                    update(jobs)
                    .where(_held(job_id, token, State.RUNNING))
                    .values(ambiguous=jobs.c.ambiguous + 1)
                )
                n += result.rowcount
        return n

    async def reclaim(self, *, all_running: bool = False) -> int:
        """Put ``running`` jobs whose lease has expired (or all, with ``all_running``) back to
        ``pending`` and drop expired leases on ``generated`` jobs. Returns jobs reclaimed."""
        now = self.clock()
        expired = (jobs.c.lease_expires_at.is_(None)) | (jobs.c.lease_expires_at < now)
        async with self._write() as conn:
            # ACTIVE repeats the partial index's condition, so SQLite reads the index
            # (a few rows) rather than the whole table (a million, when resuming).
            cond = schema.ACTIVE & (jobs.c.state == State.RUNNING.value)
            if not all_running:
                cond = cond & expired
            creating = jobs.c.task_id == ""  # a task create whose answer was never recorded
            n = (
                await conn.execute(
                    update(jobs)
                    .where(cond)
                    .values(
                        state=State.PENDING.value,
                        lease_expires_at=None,
                        claim_token=None,
                        ambiguous=jobs.c.ambiguous + case((creating, 1), else_=0),
                        task_id=case((creating, None), else_=jobs.c.task_id),
                    )
                )
            ).rowcount
            gen = jobs.c.state.in_([s.value for s in LEASED])
            await conn.execute(
                update(jobs)
                .where(schema.ACTIVE, gen if all_running else gen & expired)
                .where(jobs.c.claim_token.is_not(None))
                .values(lease_expires_at=None, claim_token=None)
            )
            return int(n)

    async def retry_failed(self, *, code: str | None = None) -> int:
        """``failed -> pending`` for every failed job (or those with error ``code``); to
        ``generated`` instead when the image was paid for and its URL is still valid.

        The failed record is kept in ``job_history`` (reason ``retry``): the same mechanism as
        :meth:`redo`. Returns the jobs put back.
        """
        select_failed = "SELECT id FROM jobs WHERE state = 'failed'"
        params: dict[str, Any] = {}
        if code is not None:
            select_failed += " AND error_code = :code"
            params = {"code": code}
        async with self._write() as conn:
            await conn.exec_driver_sql(_REQUEUE_DDL)
            await conn.exec_driver_sql("DELETE FROM requeue")
            await conn.execute(text(f"INSERT INTO requeue (id) {select_failed}"), params)
            now = float(self.clock())
            live_url = f"jobs.image_url IS NOT NULL AND jobs.url_expires_at > {now!r}"
            return await self._send_back(
                conn,
                reason="retry",
                src=State.FAILED,
                dst={State.GENERATED: live_url, State.PENDING: "1 = 1"},
                values="attempts = 0, download_attempts = 0, next_attempt_at = 0, "
                "finished_at = NULL",
            )

    async def redo(self, items: Sequence[Redo]) -> int:
        """``done -> pending`` for each of ``items``, with its new seed or prompt; the done
        record goes to ``job_history`` (reason ``redo``, with where its image was kept).

        All or nothing: if any job is not done (a run took it, or it has no image), nothing
        changes and :class:`IllegalTransition` names it. Returns the jobs put back.
        """
        if not items:
            return 0
        resets = ", ".join(
            f"{col} = NULL"
            for col in (*_RESULT_RESET, *_REVIEW_RESET, "error_code", "error_message")
        )
        async with self._write() as conn:
            await conn.exec_driver_sql(_REQUEUE_DDL)
            await conn.exec_driver_sql("DELETE FROM requeue")
            await conn.execute(
                text(
                    "INSERT INTO requeue (id, seed, prompt, file) "
                    "VALUES (:id, :seed, :prompt, :file)"
                ),
                [{"id": r.id, "seed": r.seed, "prompt": r.prompt, "file": r.file} for r in items],
            )
            # All or nothing: refuse (and roll back) if any is not done, naming the first one.
            redoable = sources_of(State.PENDING) & {State.DONE}
            marks = ", ".join(f"'{st.value}'" for st in sorted(redoable))
            wrong = (
                (
                    await conn.exec_driver_sql(
                        "SELECT r.id, j.state FROM requeue r LEFT JOIN jobs j ON j.id = r.id "
                        f"WHERE j.state IS NULL OR j.state NOT IN ({marks or 'NULL'}) LIMIT 1"
                    )
                )
                .mappings()
                .first()
            )
            if wrong is not None:
                job_id, state = wrong["id"], wrong["state"]
                what = "does not exist" if state is None else f"is {state}"
                raise IllegalTransition(f"job {job_id!r} {what}: only a done job can be redone")
            return await self._send_back(
                conn,
                reason="redo",
                src=State.DONE,
                dst={State.PENDING: "1 = 1"},
                values=(
                    # the manifest's values are kept once, from before the first redo
                    "manifest_seed = coalesce(manifest_seed, seed), "
                    "manifest_prompt = coalesce(manifest_prompt, prompt), "
                    "seed = coalesce((SELECT r.seed FROM requeue r WHERE r.id = jobs.id), seed), "
                    "prompt = coalesce((SELECT r.prompt FROM requeue r WHERE r.id = jobs.id), "
                    "prompt), attempts = 0, download_attempts = 0, next_attempt_at = 0, "
                    f"{resets}"
                ),
            )

    async def _send_back(
        self,
        conn: AsyncConnection,
        *,
        reason: str,
        src: State,
        dst: dict[State, str],
        values: str,
    ) -> int:
        """Move the jobs listed in the temporary ``requeue`` table from ``src`` back to the
        first state of ``dst`` whose SQL condition holds (on the old row of ``jobs``), after
        copying each old record to ``job_history`` with ``reason`` and the ``requeue.file``.

        The one mechanism of retry and redo: which moves are allowed comes from the state
        table (``sources_of``), never from literals here. ``values`` is the rest of the SET.
        """
        allowed: set[State] = set()
        for target in dst:
            allowed |= sources_of(target) & {src}
        if not allowed:
            raise IllegalTransition(f"a job cannot go from {src} to {', '.join(dst)}")
        states = ", ".join(f"'{s.value}'" for s in sorted(allowed))
        now = float(self.clock())
        old = (
            await conn.exec_driver_sql(
                "SELECT r.file AS requeue_file, j.* FROM requeue r JOIN jobs j ON j.id = r.id "
                f"WHERE j.state IN ({states}) ORDER BY j.{self._backend.order_column}"
            )
        ).mappings()
        kept = []
        old_records = [dict(row) for row in old]
        await attach_images(conn, old_records)
        for rec in old_records:
            file = rec.pop("requeue_file")
            record = json.dumps(rec, ensure_ascii=False, default=str)
            kept.append({"job_id": rec["id"], "replaced_at": now, "record": record, "file": file})
        if kept:
            await conn.execute(history.insert().values(reason=reason), kept)
            if reason == "redo":  # the images are made again (a retried job keeps its own)
                await drop_images(conn, [k["job_id"] for k in kept])
        cases = " ".join(
            f"WHEN {cond} THEN '{target.value}'"
            for target, cond in dst.items()
            if src in sources_of(target)
        )
        result = await conn.exec_driver_sql(
            f"UPDATE jobs SET state = CASE {cases} END, lease_expires_at = NULL, "
            f"claim_token = NULL, {values} "
            f"WHERE id IN (SELECT id FROM requeue) AND state IN ({states})"
        )
        await conn.exec_driver_sql("DELETE FROM requeue")
        return int(result.rowcount)

    async def set_review(
        self, job_id: str, review: str | None, *, note: str | None = None, keep_note: bool = True
    ) -> dict[str, Any]:
        """Mark a done job's image ``approved`` or ``rejected`` (None clears the mark); with
        ``keep_note`` False, set its note to ``note`` too. Returns the job's new record.

        One short write of the review columns only, never a state move: a run writing the same
        folder at the same time waits for it no longer than one statement.
        """
        if review is not None and review not in REVIEW_MARKS:
            raise ValueError(f"review must be one of {REVIEW_MARKS} or None, not {review!r}")
        return await self._review(
            job_id,
            {"review": review} if keep_note else {"review": review, "review_note": note},
            done_only=review is not None,
        )

    async def set_note(self, job_id: str, note: str | None) -> dict[str, Any]:
        """Set (or with None or "", clear) a person's note on any job; returns its record."""
        return await self._review(job_id, {"review_note": note or None}, done_only=False)

    async def _review(
        self, job_id: str, values: dict[str, Any], *, done_only: bool
    ) -> dict[str, Any]:
        cond = jobs.c.id == job_id
        if done_only:
            cond = cond & (jobs.c.state == State.DONE.value)
        async with self._write() as conn:
            row = (
                (
                    await conn.execute(
                        update(jobs)
                        .where(cond)
                        .values(**values, reviewed_at=self.clock())
                        .returning(jobs)
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                state = (
                    await conn.execute(select(jobs.c.state).where(jobs.c.id == job_id))
                ).scalar()
                if state is None:
                    raise UnknownJob(f"no job has the id {job_id!r}")
                raise IllegalTransition(
                    f"job {job_id!r} is {state}: only a done image can be approved or rejected"
                )
            return _public(dict(row))

    # --------------------------------------------------------------------- reads

    async def stats(self, *, totals: bool = True) -> Stats:
        """Counts per state, failures by code, images billed, cost and retry counters.

        ``totals=False`` skips the sums over every row (billed, cost, retry counters: left 0),
        for a resuming run that only needs the counts before its first call.
        """
        now = self.clock()
        async with self._read() as conn:
            by_state = {
                s: int(n)
                for s, n in (
                    await conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state))
                ).all()
            }
            errors = {
                (c or "unknown"): int(n)
                for c, n in (
                    await conn.execute(
                        select(jobs.c.error_code, func.count())
                        .where(jobs.c.state == State.FAILED.value)
                        .group_by(jobs.c.error_code)
                    )
                ).all()
            }
            sums: Any = (0, 0, 0, 0)
            spend: list[Spend] = []
            lanes: tuple[LaneCalls, ...] = ()
            by_model: dict[str, dict[str, int]] = {}
            if totals:
                sums = (
                    await conn.execute(
                        select(
                            func.coalesce(func.sum(jobs.c.attempts), 0),
                            func.coalesce(func.sum(jobs.c.throttled), 0),
                            func.coalesce(func.sum(jobs.c.ambiguous), 0),
                            func.coalesce(func.sum(jobs.c.regenerated), 0),
                        )
                    )
                ).one()
                spend = await _spend(conn)
                lanes = await _lane_calls(conn)
                for model, state, n in (
                    await conn.execute(
                        select(jobs.c.model, jobs.c.state, func.count()).group_by(
                            jobs.c.model, jobs.c.state
                        )
                    )
                ).all():
                    by_model.setdefault(str(model), {})[str(state)] = int(n)
            due = (
                await conn.execute(
                    select(func.count()).where(
                        schema.ACTIVE,
                        jobs.c.state == State.PENDING.value,
                        jobs.c.next_attempt_at <= now,
                    )
                )
            ).scalar_one()
            reviews: dict[str, int] = {}
            short: Any = (0, 0)
            if totals:
                short = (
                    await conn.execute(
                        select(
                            func.count(),
                            func.coalesce(
                                func.sum(jobs.c.n - func.coalesce(jobs.c.image_count, 0)), 0
                            ),
                        ).where(jobs.c.state == State.DONE.value, jobs.c.shortfall.is_not(None))
                    )
                ).one()
                reviews = {
                    str(mark): int(n)
                    for mark, n in (
                        await conn.execute(
                            select(jobs.c.review, func.count())
                            .where(jobs.c.review.is_not(None))
                            .group_by(jobs.c.review)
                        )
                    ).all()
                }
        for s in State:
            by_state.setdefault(s.value, 0)
        return Stats(
            by_state=by_state,
            errors_by_code=errors,
            spend=tuple(spend),
            attempts=int(sums[0]),
            throttled=int(sums[1]),
            ambiguous=int(sums[2]),
            regenerated=int(sums[3]),
            due_pending=int(due),
            by_model=by_model,
            short_jobs=int(short[0]),
            images_short=int(short[1]),
            reviews=reviews,
            lanes=lanes,
        )

    async def save_lane_calls(
        self, rows: Sequence[LaneCalls], *, worker: str = "", started_at: float
    ) -> None:
        """Write this run's figures per lane and model (each row replaces the run's earlier
        write of it): a run saves them as it goes, so a killed run loses only the last few
        seconds of them."""
        if not rows:
            return
        params = [
            {
                "run": r.run,
                "lane": r.lane,
                "model": r.model,
                "worker": worker,
                "started_at": started_at,
                "quota": r.quota,
                "calls": r.calls,
                "accepted": r.accepted,
                "throttled": r.throttled,
                "first_accepted_at": r.first_accepted_at,
                "last_accepted_at": r.last_accepted_at,
                "images": r.images,
                "cost_micros": int(r.cost * MICROS),
                "currency": r.currency,
                "emulated": int(r.emulated),
            }
            for r in rows
        ]
        async with self._write() as conn:
            await conn.execute(_SAVE_LANE_CALLS, params)

    async def lane_calls(self) -> tuple[LaneCalls, ...]:
        """Every run's figures per lane and model, oldest run first."""
        async with self._read() as conn:
            return await _lane_calls(conn)

    async def spend(self) -> tuple[Spend, ...]:
        """What the folder's images cost, per currency, real apart from emulated."""
        async with self._read() as conn:
            return tuple(await _spend(conn))

    async def endpoints(self) -> dict[str | None, int]:
        """Jobs with an image generated, by the endpoint it came from (None: not recorded, a
        folder made before endpoints were)."""
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(jobs.c.endpoint, func.count())
                    .where(jobs.c.billed > 0)
                    .group_by(jobs.c.endpoint)
                )
            ).all()
        return {endpoint: int(n) for endpoint, n in rows}

    async def pending_moves(self) -> list[Moved]:
        """Done jobs' images an import moved to a new output path, not yet moved on disk, in
        the order they were recorded."""
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(history.c.seq, history.c.job_id, history.c.file, jobs.c.output, jobs.c.n)
                    .join(jobs, jobs.c.id == history.c.job_id)
                    .where(history.c.reason == MOVE)
                    .order_by(history.c.seq)
                )
            ).all()
            several = [{"id": j, "n": n} for _, j, _, _, n in rows if n > 1]
            await attach_images(conn, several)
        indexes = {r["id"]: tuple(i["index"] for i in r.get("images", ())) for r in several}
        return [
            Moved(seq=seq, job_id=j, old=old, new=new, n=n, indexes=indexes.get(j, ()))
            for seq, j, old, new, n in rows
        ]

    async def finish_moves(self, seqs: Sequence[int]) -> None:
        """Mark recorded moves as carried out."""
        if not seqs:
            return
        async with self._write() as conn:
            await conn.execute(
                update(history).where(history.c.seq.in_(list(seqs))).values(reason=MOVED)
            )

    async def count(self) -> int:
        """How many jobs the table holds (withdrawn ones included)."""
        async with self._read() as conn:
            return int((await conn.execute(select(func.count()).select_from(jobs))).scalar_one())

    async def pending_by_kind(
        self, *, live_run: bool = True, calls: bool = False
    ) -> dict[tuple[str, bool], int]:
        """Images still to generate (``n`` a job), counted by (model, prompt_extend): of
        pending jobs, running ones whose lease expired (a dead run's), and submitted ones (their
        task is created, its image not yet billed). A job a live run holds is being generated.
        ``live_run=False``: no run holds the folder, so every running job is a dead run's.
        ``calls``: count the jobs (one call each, whatever their ``n``) instead."""
        now = self.clock()
        running = jobs.c.state == State.RUNNING.value
        if live_run:
            running = and_(
                running,
                or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now),
            )
        async with self._read() as conn:
            rows = (
                await conn.execute(
                    select(
                        jobs.c.model,
                        jobs.c.prompt_extend,
                        func.count() if calls else func.sum(jobs.c.n),
                    )
                    .where(
                        schema.ACTIVE,
                        or_(
                            jobs.c.state.in_([State.PENDING.value, State.SUBMITTED.value]),
                            running,
                        ),
                    )
                    .group_by(jobs.c.model, jobs.c.prompt_extend)
                )
            ).all()
        return {(model, bool(extend)): int(n) for model, extend, n in rows}

    async def get_meta(self, key: str) -> str | None:
        """A value of the run folder's ``meta`` table (None when unset)."""
        async with self._read() as conn:
            value = (await conn.execute(select(meta.c.value).where(meta.c.key == key))).scalar()
            return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        """Set a value of the ``meta`` table (``schema_version`` is not writable)."""
        if key == "schema_version":
            raise ValueError("schema_version is managed by the store")
        async with self._write() as conn:
            await conn.execute(_SET_META, {"key": key, "value": value})

    @_rides_out
    async def next_due_at(self) -> float | None:
        """When the earliest waiting job becomes due (None when no job waits). On a shared
        table a job another worker runs waits too: until its lease expires, when a claim may
        take it over (the worker may have died)."""
        async with self._read() as conn:
            value = (
                await conn.execute(
                    select(func.min(jobs.c.next_attempt_at)).where(
                        jobs.c.state.in_(
                            [State.PENDING.value, State.GENERATED.value, State.SUBMITTED.value]
                        )
                    )
                )
            ).scalar()
            if self.shared:
                held = (
                    await conn.execute(
                        select(func.min(jobs.c.lease_expires_at)).where(
                            schema.ACTIVE, jobs.c.state == State.RUNNING.value
                        )
                    )
                ).scalar()
                if held is not None:
                    value = held if value is None else min(value, held)
            return None if value is None else float(value)

    async def get(self, job_id: str) -> dict[str, Any] | None:
        """One job's full record (claim token and worker omitted; a job of several images
        has its ``images``, see :func:`jobs.merge.attach_images`)."""
        async with self._read() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).mappings().first()
            if row is None:
                return None
            found = [_public(dict(row))]
            await attach_images(conn, found)
            return found[0]

    async def variables(self) -> dict[str, frozenset[str]]:
        """The manifest variables stored with any job, in the order they first appear (by
        manifest row, then by position in the row), each with the JSON types its values have
        (``"integer"``, ``"real"``, ``"text"``, ``"null"``; SQLite's ``json_each`` names).
        Worked out once after each import that changed any, then kept in ``meta``."""
        known = await self.get_meta(_VARIABLES_KEY)
        if known is not None:
            return {name: frozenset(kinds) for name, kinds in json.loads(known)}
        found = await self._scan_variables()
        summary = json.dumps([[name, sorted(kinds)] for name, kinds in found.items()])
        with suppress(JobStoreError):  # a folder on read-only media: worked out again next time
            await self.set_meta(_VARIABLES_KEY, summary)
        return found

    async def _scan_variables(self) -> dict[str, frozenset[str]]:
        async with self._read() as conn:
            # JSON is read differently by each database: the backend's query
            rows: list[Any] = list(await conn.exec_driver_sql(self._backend.variables_sql))
            return {str(key): frozenset(str(kinds).split(",")) for key, kinds in rows}

    @_rides_out
    async def done_records(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The records of those of ``ids`` that are done, in manifest order, with only what
        ``metadata.jsonl`` shows (id, state, output, prompt, seed, size, width, height,
        prompt_extend, actual_prompt, request_id, sha256, vars, model, n, params, review, and
        the ``images`` of a job of several): the run asks for every batch of images it saves."""
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), 500):
            part = list(ids[start : start + 500])
            order: Any = literal_column(f"jobs.{self._backend.order_column}")
            async with self._read() as conn:
                rows = await conn.execute(
                    select(*(jobs.c[name] for name in _DONE_NAMES))
                    .where(jobs.c.id.in_(part), jobs.c.state == State.DONE.value)
                    .order_by(order)
                )
                part_found = [dict(zip(_DONE_NAMES, row, strict=True)) for row in rows]
                await attach_images(conn, part_found)
                found += part_found
        for rec in found:
            rec["prompt_extend"] = bool(rec["prompt_extend"])
        return found

    async def iter_records(
        self,
        *,
        batch: int = 2000,
        state: State | None = None,
        finished_since: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every job in manifest order, streamed in batches (claim token and worker omitted;
        a job of several images has its ``images``); only those in ``state``, or finished at
        or after ``finished_since``, when given."""
        last = 0
        while True:
            order: Any = literal_column(f"jobs.{self._backend.order_column}")
            query = select(order.label("_order"), jobs).where(order > last).order_by(order)
            query = query.limit(batch)
            if state is not None:
                query = query.where(jobs.c.state == state.value)
            if finished_since is not None:
                query = query.where(jobs.c.finished_at >= finished_since)
            async with self._read() as conn:
                result = await conn.execute(query)
                keys = list(result.keys())
                rows = result.all()
                at_n = keys.index("n")
                several = [row[1] for row in rows if row[at_n] > 1]  # row[1]: the id
                found = await images_of(conn, several) if several else {}
            if not rows:
                return
            for row in rows:
                rec = dict(zip(keys, row, strict=True))  # cheaper than row._mapping per row
                last = rec.pop("_order")
                if rec["n"] > 1:
                    rec["images"] = found.get(rec["id"], [])
                yield _public(rec)

    async def records(
        self, *, ids: Sequence[str] | None = None, review: str | None = None
    ) -> list[dict[str, Any]]:
        """The records of ``ids`` (in that order; unknown ids are left out), or of every job
        marked ``review``, in manifest order."""
        out: list[dict[str, Any]] = []
        async with self._read() as conn:
            if ids is not None:
                found: dict[str, dict[str, Any]] = {}
                unique = list(dict.fromkeys(ids))
                for at in range(0, len(unique), _IN_MAX):
                    part = unique[at : at + _IN_MAX]
                    rows = (await conn.execute(select(jobs).where(jobs.c.id.in_(part)))).mappings()
                    found.update((r["id"], _public(dict(r))) for r in rows)
                out = [found[i] for i in unique if i in found]
            if review is not None:
                rowid: Any = literal_column(f"jobs.{self._backend.order_column}")
                query = select(jobs).where(jobs.c.review == review).order_by(rowid)
                out += [_public(dict(r)) for r in (await conn.execute(query)).mappings()]
            await attach_images(conn, out)
        return out

    async def changed_since(self, since: float) -> list[dict[str, Any]]:
        """Every job created, started, generated, finished or reviewed at or after ``since``
        (a page that shows the table polls this while a run writes)."""
        stamps = (
            jobs.c.created_at,
            jobs.c.started_at,
            jobs.c.generated_at,
            jobs.c.finished_at,
            jobs.c.reviewed_at,
        )
        rowid: Any = literal_column(f"jobs.{self._backend.order_column}")
        query = select(jobs).where(or_(*(c >= since for c in stamps))).order_by(rowid)
        async with self._read() as conn:
            out = [_public(dict(r)) for r in (await conn.execute(query)).mappings()]
            await attach_images(conn, out)
            return out

    async def iter_history(
        self, *, batch: int = 2000, job_ids: Sequence[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every record set aside (by a redo, a retry or ``--replace``), oldest first, or
        those of ``job_ids``: ``seq``, ``job_id``, ``replaced_at``, ``reason``, ``file``
        (where its image was kept, relative to the run folder, or None) and ``record``, the
        job's row as it was (a dict)."""
        last = 0
        while True:
            query = select(history).where(history.c.seq > last).order_by(history.c.seq)
            if job_ids is not None:
                query = query.where(history.c.job_id.in_(list(job_ids)[:_IN_MAX]))
            async with self._read() as conn:
                rows = (await conn.execute(query.limit(batch))).mappings().all()
            if not rows:
                return
            for row in rows:
                rec = dict(row)
                last = rec["seq"]
                try:
                    old = json.loads(rec["record"])
                except ValueError:
                    old = {}
                rec["record"] = _public(old) if "cost_micros" in old else old
                yield rec


_LANE_FIELDS = tuple(c.name for c in lane_calls.columns)
_SAVE_LANE_CALLS = text(
    f"INSERT INTO lane_calls ({', '.join(_LANE_FIELDS)}) "
    f"VALUES ({', '.join(':' + c for c in _LANE_FIELDS)}) "
    "ON CONFLICT (run, lane, model) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _LANE_FIELDS if c not in ("run", "lane", "model"))
)


async def _lane_calls(conn: AsyncConnection) -> tuple[LaneCalls, ...]:
    rows = (
        await conn.execute(
            select(lane_calls).order_by(
                lane_calls.c.started_at, lane_calls.c.lane, lane_calls.c.model
            )
        )
    ).mappings()
    return tuple(
        LaneCalls(
            run=r["run"],
            lane=r["lane"],
            model=r["model"],
            quota=r["quota"],
            calls=int(r["calls"]),
            accepted=int(r["accepted"]),
            throttled=int(r["throttled"]),
            first_accepted_at=r["first_accepted_at"],
            last_accepted_at=r["last_accepted_at"],
            images=int(r["images"]),
            cost=Decimal(int(r["cost_micros"])) / MICROS,
            currency=r["currency"],
            emulated=bool(r["emulated"]),
        )
        for r in rows
    )


async def _read_version(conn: AsyncConnection) -> int | None:
    """The database's schema version, or None for a new (empty) database."""
    if not await conn.run_sync(lambda c: inspect(c).has_table("meta")):
        return None
    found = (
        await conn.execute(select(meta.c.value).where(meta.c.key == "schema_version"))
    ).scalar()
    return None if found is None else int(found)


async def _spend(conn: AsyncConnection) -> list[Spend]:
    """Images billed and their cost per (currency, emulated or not). Jobs of a folder made
    before currencies were recorded count as US dollars."""
    # Constants inline (not bound): PostgreSQL matches GROUP BY expressions by their text.
    emulated = func.coalesce(
        jobs.c.endpoint == literal_column(f"'{EMULATOR_ENDPOINT}'"), literal_column("false")
    )
    currency = func.coalesce(jobs.c.currency, literal_column("'USD'"))
    rows = (
        await conn.execute(
            select(
                currency,
                emulated,
                func.sum(jobs.c.billed),
                func.sum(jobs.c.cost_micros),
                jobs.c.model,
            )
            .where(jobs.c.billed > 0)
            .group_by(currency, emulated, jobs.c.model)
        )
    ).all()
    return [
        Spend(
            currency=str(cur),
            emulated=bool(emu),
            images=int(n),
            amount=Decimal(int(micros)) / MICROS,
            model=str(model),
        )
        for cur, emu, n, micros, model in sorted(
            rows, key=lambda r: (str(r[0]), bool(r[1]), str(r[4]))
        )
    ]


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    rec.pop("claim_token", None)
    rec.pop("worker", None)
    rec.pop("output_key", None)
    rec["prompt_extend"] = bool(rec["prompt_extend"])
    rec["cost"] = str(Decimal(int(rec.pop("cost_micros") or 0)) / MICROS)
    return rec
