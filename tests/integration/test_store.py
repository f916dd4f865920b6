"""JobStore on a real SQLite file: opening, pragmas, schema version, import, reads.

Leases and outcomes are in test_store_leases.py, two stores on one file in
test_store_concurrency.py, the 200,000-row plan check in test_store_scale.py and the
hypothesis state machine in test_store_stateful.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import Pool

from jobs import schema
from jobs.errors import (
    JobStoreError,
    LeaseLost,
    ManifestError,
    ManifestInvalid,
    SchemaMismatch,
    StoreUnavailable,
)
from jobs.spec import JobSpec
from jobs.states import State
from jobs.store import ImportReport, JobStore
from tests.conftest import store_target

from .store_support import (
    T0,
    FakeClock,
    generated,
    numbered,
    raw,
    row,
    spec,
    specs,
    states,
    stored,
    table,
)

pytestmark = pytest.mark.anyio

SOURCE = "catalog.csv"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path, backend: str) -> Path:
    """The store's SQLite file, or (backend ``postgres``) the URL of an empty database."""
    return store_target(backend, tmp_path / "run" / "batcher.db")  # type: ignore[return-value]


@pytest.fixture
async def store(db: Path, clock: FakeClock) -> AsyncIterator[JobStore]:
    s = await JobStore.open(db, clock=clock)
    try:
        yield s
    finally:
        await s.close()


# ---------------------------------------------------------------- open, pragmas, schema


@pytest.mark.sqlite_only
async def test_open_creates_the_run_folder_and_the_schema(db: Path, store: JobStore) -> None:
    assert store.path == db
    assert await anyio.Path(db).is_file()
    with raw(db) as con:
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        version = con.execute("SELECT key, value FROM meta").fetchall()
        active = con.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'ix_jobs_active'"
        ).fetchone()[0]
    assert {"jobs", "job_history", "meta", "ix_jobs_active", "ix_jobs_failed_code"} <= names
    assert [tuple(r) for r in version] == [("schema_version", str(schema.SCHEMA_VERSION))]
    assert f"WHERE {schema.ACTIVE_SQL}" in active


@pytest.mark.sqlite_only
async def test_every_connection_gets_the_pragmas(db: Path, clock: FakeClock) -> None:
    seen: list[dict[str, Any]] = []

    def on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        cur = dbapi_conn.cursor()
        values = {}
        for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys"):
            cur.execute(f"PRAGMA {name}")
            values[name] = cur.fetchone()[0]
        cur.close()
        seen.append(values)

    event.listen(Pool, "checkout", on_checkout)
    try:
        async with await JobStore.open(db, clock=clock) as store:
            await store.import_specs(specs(["a"]), source=SOURCE)  # a write
            await store.stats()  # a read
            await store.claim(limit=1, lease_seconds=60)
    finally:
        event.remove(Pool, "checkout", on_checkout)
    assert len(seen) >= 4  # open, import, stats, claim: NullPool, a connection each
    for values in seen:
        assert values["journal_mode"] == "wal"
        assert values["synchronous"] == 2  # FULL
        assert values["busy_timeout"] >= 1000
        assert values["foreign_keys"] == 1
    # WAL is a property of the file: a plain connection sees it too.
    with raw(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_reopen_keeps_jobs_and_one_version_row(db: Path, clock: FakeClock) -> None:
    async with await JobStore.open(db, clock=clock) as store:
        await store.import_specs(specs(["a", "b"]), source=SOURCE)
    async with await JobStore.open(db, clock=clock, create=False) as store:
        assert (await store.stats()).total == 2
    with raw(db) as con:
        assert con.execute("SELECT count(*) FROM meta").fetchone()[0] == 1


async def test_other_schema_version_is_refused(db: Path, clock: FakeClock) -> None:
    async with await JobStore.open(db, clock=clock) as store:
        await store.import_specs(specs(["a"]), source=SOURCE)
    with raw(db) as con:
        con.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    with pytest.raises(SchemaMismatch) as info:
        await JobStore.open(db, clock=clock)
    assert "999" in str(info.value)
    assert str(db) in str(info.value)
    assert isinstance(info.value, JobStoreError)
    with raw(db) as con:  # the refused open changed nothing
        assert con.execute("SELECT value FROM meta").fetchone()[0] == "999"
        assert con.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "content",
    [b"this is not a database, it is a text file\n" * 200, bytes(range(256)) * 64],
    ids=["text", "binary"],
)
async def test_a_file_that_is_not_a_database_is_refused_clearly(
    db: Path, clock: FakeClock, content: bytes
) -> None:
    await anyio.Path(db.parent).mkdir(parents=True)
    await anyio.Path(db).write_bytes(content)
    with pytest.raises(StoreUnavailable) as info:
        await JobStore.open(db, clock=clock)
    message = str(info.value)
    assert "\n" not in message
    assert "not a batcher database" in message
    for sql in ("PRAGMA", "SELECT", "CREATE", "BEGIN", "[SQL", "sqlite3."):
        assert sql not in message
    assert isinstance(info.value.__cause__, DBAPIError)  # translated, with the cause kept
    assert await anyio.Path(db).read_bytes() == content  # and left alone


async def test_open_without_create_needs_an_existing_file(db: Path, clock: FakeClock) -> None:
    with pytest.raises(StoreUnavailable, match="no job database"):
        await JobStore.open(db, clock=clock, create=False)
    if isinstance(db, Path):
        assert not db.parent.exists()


async def test_open_below_a_file_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    (tmp_path / "run").write_text("a file where the run folder should be")
    with pytest.raises(StoreUnavailable, match="cannot create"):
        await JobStore.open(tmp_path / "run" / "batcher.db", clock=clock)


# --------------------------------------------------------------------------- import


async def test_import_counts_and_rows(db: Path, store: JobStore, clock: FakeClock) -> None:
    batch = [spec("a", line=2), spec("b", line=3, prompt_extend=True), spec("c", line=4)]
    report = await store.import_specs(batch, source=SOURCE)
    assert report == ImportReport(total=3, added=3, unchanged=0, replaced=0)
    rows = table(db)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    for r, s in zip(rows, batch, strict=True):
        assert r["state"] == "pending"
        assert r["line"] == s.line
        assert r["prompt"] == s.prompt
        assert r["prompt_extend"] == int(s.prompt_extend)
        assert r["output_key"] == s.output_key
        assert (r["model"], r["size"], r["seed"], r["output"]) == (
            s.model,
            s.size,
            s.seed,
            s.output,
        )
        assert (r["attempts"], r["download_attempts"], r["billed"], r["cost_micros"]) == (0,) * 4
        assert r["next_attempt_at"] == 0
        assert r["claim_token"] is None and r["lease_expires_at"] is None
        assert r["created_at"] == clock.now


async def test_a_first_import_reports_its_jobs_per_kind_as_the_table_counts_them(
    db: Path, store: JobStore
) -> None:
    """A first import into the empty table counts its rows per (model, prompt_extend) as they
    go in (SQLite's INSERTs, PostgreSQL's COPY), exactly as the table's own counts; a later
    import (a merge) does not."""
    batch = [
        *(spec(f"z{i}", line=2 + i) for i in range(600)),  # more than one INSERT statement
        *(spec(f"e{i}", line=700 + i, prompt_extend=True) for i in range(5)),
        *(spec(f"w{i}", line=800 + i, model="wan2.2-t2i-flash", n=3) for i in range(7)),
        spec("w-odd", line=900, model="wan2.2-t2i-flash", n=2, prompt_extend=True),
    ]
    batch.insert(300, spec("q-mid", line=1000, model="qwen-image"))  # a statement of mixed rows
    report = await store.import_specs(batch, source=SOURCE)
    assert report.added == report.total == len(batch)
    jobs_of, images_of = await store.pending_by_kind(calls=True), await store.pending_by_kind()
    counted = {kind: (jobs, images_of[kind]) for kind, jobs in jobs_of.items()}
    assert counted == {
        ("z-image-turbo", False): (600, 600),
        ("qwen-image", False): (1, 1),
        ("z-image-turbo", True): (5, 5),
        ("wan2.2-t2i-flash", False): (7, 21),
        ("wan2.2-t2i-flash", True): (1, 2),
    }
    assert report.fresh == counted
    again = await store.import_specs([*batch, spec("late", line=2000)], source=SOURCE)
    assert (again.added, again.fresh) == (1, None)


@pytest.mark.parametrize("first", [True, False], ids=["first_import", "later_import"])
async def test_rows_import_as_their_specs_do(tmp_path: Path, clock: FakeClock, first: bool) -> None:
    batch = [spec("a", line=2), spec("b", line=3, prompt_extend=True), spec("c", line=4)]
    tables = []
    for name, rows in (("specs", None), ("rows", [s.row() for s in batch])):
        db = tmp_path / name / "batcher.db"
        async with await JobStore.open(db, clock=clock) as store:
            if not first:
                await store.import_specs([spec("keep", line=1)], source=SOURCE)
            if rows is None:
                report = await store.import_specs(batch, source=SOURCE)
            else:
                report = await store.import_rows(rows, source=SOURCE)
        assert report == ImportReport(total=3, added=3, unchanged=0, replaced=0)
        tables.append(table(db))
    assert tables[0] == tables[1]
    assert [r["prompt_extend"] for r in tables[1][-3:]] == [0, 1, 0]


@pytest.mark.parametrize("first", [True, False], ids=["first_import", "later_import"])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 2_047, 2_048, 2_049, 4_161])
async def test_every_row_lands_in_order_whatever_the_count(
    db: Path, store: JobStore, clock: FakeClock, first: bool, n: int
) -> None:
    """Rows go in by statements of many rows (ROWS_PER_INSERT) in chunks: no row is lost or
    moved at the edges, and each gets its own values."""
    if not first:
        await store.import_specs([spec("keep", line=1)], source=SOURCE)
    batch = [
        spec(f"job{i:06d}", line=i + 2, seed=i, prompt_extend=i % 3 == 0, prompt=f"p{i}")
        for i in range(n)
    ]
    report = await store.import_specs(batch, source=SOURCE)
    assert (report.total, report.added) == (n, n)
    rows = table(db)[0 if first else 1 :]
    assert [(r["id"], r["line"], r["seed"], r["prompt"]) for r in rows] == [
        (s.id, s.line, s.seed, s.prompt) for s in batch
    ]
    assert [r["prompt_extend"] for r in rows] == [int(s.prompt_extend) for s in batch]
    assert {(r["state"], r["created_at"]) for r in rows} == {("pending", clock.now)}


async def test_empty_import(store: JobStore) -> None:
    assert await store.import_specs([], source=SOURCE) == ImportReport(
        total=0, added=0, unchanged=0, replaced=0
    )
    assert (await store.stats()).total == 0


async def test_reimport_adds_nothing_and_rewrites_nothing(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    await store.import_specs(numbered(30), source=SOURCE)
    before = table(db)
    clock.advance(3600)
    report = await store.import_specs(numbered(30), source=SOURCE)
    assert report == ImportReport(total=30, added=0, unchanged=30, replaced=0)
    assert table(db) == before


async def test_reimport_with_shifted_lines_is_not_a_change(db: Path, store: JobStore) -> None:
    await store.import_specs(specs(["a", "b"], first_line=2), source=SOURCE)
    report = await store.import_specs(specs(["a", "b"], first_line=10), source=SOURCE)
    assert report.unchanged == 2
    assert report.replaced == 0


async def test_added_rows_only_and_existing_rows_untouched(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    await store.import_specs(specs(["a", "b"]), source=SOURCE)
    [claim] = await store.claim(limit=1, lease_seconds=60)
    assert claim.id == "a"
    before_a = row(db, "a")
    t0 = clock.now
    clock.advance(10)
    report = await store.import_specs(specs(["a", "b", "c", "d"]), source=SOURCE)
    assert report == ImportReport(total=4, added=2, unchanged=2, replaced=0)
    assert row(db, "a") == before_a  # still running under its lease
    assert [r["id"] for r in table(db)] == ["a", "b", "c", "d"]
    assert row(db, "b")["created_at"] == t0
    assert row(db, "c")["created_at"] == clock.now
    assert states(db) == {"a": "running", "b": "pending", "c": "pending", "d": "pending"}


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a different prompt"},
        {"size": "1280*720"},
        {"seed": 7},
        {"prompt_extend": True},
        {"model": "another-model"},
    ],
    ids=lambda c: next(iter(c)),
)
async def test_changed_content_is_refused_and_nothing_is_written(
    db: Path, store: JobStore, change: dict[str, Any]
) -> None:
    await store.import_specs(specs(["a", "b"]), source=SOURCE)
    before = table(db)
    again = [spec("a", line=2), spec("b", line=3, **change), spec("c", line=4)]
    with pytest.raises(ManifestInvalid) as info:
        await store.import_specs(again, source=SOURCE)
    [error] = info.value.errors
    assert (error.path, error.line, error.field) == (SOURCE, 3, "id")
    assert "'b'" in error.message
    assert str(info.value).startswith(f"{SOURCE}:3: id: job 'b' already exists")
    assert table(db) == before  # the new row c was rolled back with the rest
    with raw(db) as con:
        assert con.execute("SELECT count(*) FROM job_history").fetchone()[0] == 0


async def test_changed_rows_are_all_reported_in_line_order_up_to_max(store: JobStore) -> None:
    ids = [f"j{i}" for i in range(6)]
    await store.import_specs(specs(ids), source=SOURCE)
    changed = [spec(i, line=100 - n, prompt="new") for n, i in enumerate(ids)]
    with pytest.raises(ManifestInvalid) as info:
        await store.import_specs(changed, source=SOURCE)
    assert [e.line for e in info.value.errors] == sorted(95 + n for n in range(6))
    assert not info.value.truncated
    with pytest.raises(ManifestInvalid) as info:
        await store.import_specs(changed, source=SOURCE, max_errors=2)
    assert [e.line for e in info.value.errors] == [95, 96]
    assert info.value.truncated
    assert str(info.value).endswith("... (more problems not shown)")


async def _drive_to_done(store: JobStore, job_id: str) -> None:
    [claim] = [c for c in await store.claim(limit=100, lease_seconds=60) if c.id == job_id]
    await store.record_generated(job_id, claim.token, generated(), lease_seconds=60)
    await store.complete(job_id, claim.token, stored("old"))


async def test_replace_resets_to_pending_and_keeps_the_old_record(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    await store.import_specs([spec("a", line=2), spec("b", line=3)], source=SOURCE)
    await _drive_to_done(store, "a")
    old = row(db, "a")
    clock.advance(100)
    report = await store.import_specs(
        [spec("a", line=2, prompt="a new prompt", seed=9), spec("b", line=3)],
        source=SOURCE,
        replace=True,
    )
    assert report == ImportReport(total=2, added=0, unchanged=1, replaced=1)
    new = row(db, "a")
    assert new["state"] == "pending"
    assert (new["prompt"], new["seed"]) == ("a new prompt", 9)
    for column in (
        "claim_token",
        "lease_expires_at",
        "request_id",
        "image_url",
        "url_expires_at",
        "sha256",
        "bytes",
        "finished_at",
        "generated_at",
        "error_code",
    ):
        assert new[column] is None, column
    assert (new["attempts"], new["download_attempts"], new["next_attempt_at"]) == (0, 0, 0)
    # The money already spent stays spent (and counted).
    assert (new["billed"], new["cost_micros"]) == (old["billed"], old["cost_micros"])
    with raw(db) as con:
        hist = con.execute(
            "SELECT job_id, replaced_at, record FROM job_history ORDER BY seq"
        ).fetchall()
    [(job_id, replaced_at, record)] = hist
    assert (job_id, replaced_at) == ("a", clock.now)
    kept = json.loads(record)
    assert kept["state"] == "done"
    assert kept["prompt"] == old["prompt"]
    assert kept["sha256"] == old["sha256"]
    assert kept["request_id"] == "req-1"
    # and it can run again (on a shared table, with "b", whose lease has expired by now)
    claims = await store.claim(limit=2, lease_seconds=60)
    [claim] = [c for c in claims if c.id == "a"]
    assert claim.prompt == "a new prompt"


async def test_replace_without_a_change_replaces_nothing(db: Path, store: JobStore) -> None:
    await store.import_specs(specs(["a"]), source=SOURCE)
    before = table(db)
    report = await store.import_specs(specs(["a"]), source=SOURCE, replace=True)
    assert report.replaced == 0 and report.unchanged == 1
    assert table(db) == before


async def test_replace_of_a_running_job_fences_its_worker(db: Path, store: JobStore) -> None:
    await store.import_specs(specs(["a"]), source=SOURCE)
    [claim] = await store.claim(limit=1, lease_seconds=60)
    await store.import_specs([spec("a", line=2, prompt="new")], source=SOURCE, replace=True)
    after = row(db, "a")
    with pytest.raises(LeaseLost):
        await store.record_generated("a", claim.token, generated(), lease_seconds=60)
    assert row(db, "a") == after
    assert after["state"] == "pending"


async def test_output_colliding_with_another_job_is_refused(db: Path, store: JobStore) -> None:
    await store.import_specs([spec("a", line=2, output="shots/A.png")], source=SOURCE)
    before = table(db)
    with pytest.raises(ManifestInvalid) as info:
        await store.import_specs(
            [spec("b", line=2), spec("c", line=3, output="Shots/a.PNG")], source=SOURCE
        )
    [error] = info.value.errors
    assert (error.line, error.field) == (3, "output")
    assert "Shots/a.PNG" in error.message and "'a'" in error.message
    assert table(db) == before  # b was not imported either


async def test_replace_does_not_excuse_a_collision(db: Path, store: JobStore) -> None:
    await store.import_specs([spec("a", line=2), spec("b", line=3)], source=SOURCE)
    with pytest.raises(ManifestInvalid) as info:
        await store.import_specs(
            [spec("a", line=2), spec("b", line=3, output="a.png")], source=SOURCE, replace=True
        )
    assert [(e.line, e.field) for e in info.value.errors] == [(3, "output")]
    assert row(db, "b")["output"] == "b.png"


async def test_replace_may_swap_two_outputs(db: Path, store: JobStore) -> None:
    """Both jobs change, each takes the other's path: after the import no path is shared."""
    await store.import_specs([spec("a", line=2), spec("b", line=3)], source=SOURCE)
    report = await store.import_specs(
        [
            spec("a", line=2, output="b.png", prompt="new a"),
            spec("b", line=3, output="a.png", prompt="new b"),
        ],
        source=SOURCE,
        replace=True,
    )
    assert report.replaced == 2
    assert (row(db, "a")["output_key"], row(db, "b")["output_key"]) == ("b.png", "a.png")


async def test_an_iterator_failing_halfway_imports_nothing(db: Path, store: JobStore) -> None:
    await store.import_specs(specs(["keep"]), source=SOURCE)
    before = table(db)
    problem = ManifestInvalid([ManifestError(SOURCE, 25_002, "prompt", "the prompt is empty")])

    def manifest() -> Iterator[JobSpec]:
        # more than one staging chunk goes to the database before the failure
        yield from numbered(25_000)
        raise problem

    with pytest.raises(ManifestInvalid) as info:
        await store.import_specs(manifest(), source=SOURCE)
    assert info.value is problem
    assert table(db) == before
    # the staging table did not survive into the next import
    report = await store.import_specs(specs(["keep", "new"]), source=SOURCE)
    assert report == ImportReport(total=2, added=1, unchanged=1, replaced=0)


async def test_a_first_import_failing_halfway_imports_nothing(db: Path, store: JobStore) -> None:
    """The first import into an empty table takes another path (straight into the table)."""
    problem = ManifestInvalid([ManifestError(SOURCE, 45_002, "seed", "not a number")])

    def manifest() -> Iterator[JobSpec]:
        yield from numbered(45_000)
        raise problem

    with pytest.raises(ManifestInvalid) as info:
        await store.import_specs(manifest(), source=SOURCE)
    assert info.value is problem
    assert table(db) == []
    report = await store.import_specs(specs(["a", "b"]), source=SOURCE)
    assert report == ImportReport(total=2, added=2, unchanged=0, replaced=0)


@pytest.mark.sqlite_only
async def test_a_first_import_leaves_the_indexes_a_new_database_has(
    db: Path, store: JobStore
) -> None:
    """It drops an index to build it at the end: the same index, and a failed one too."""

    def indexes() -> list[tuple[str, str]]:
        with raw(db) as con:
            return con.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name"
            ).fetchall()

    fresh = indexes()
    await store.import_specs(numbered(3_000), source=SOURCE)
    assert indexes() == fresh
    problem = ManifestInvalid([ManifestError(SOURCE, 9, "seed", "not a number")])

    def failing() -> Iterator[JobSpec]:
        yield from numbered(3_000, prefix="other")
        raise problem

    with raw(db) as con:
        con.execute("DELETE FROM jobs")
    with pytest.raises(ManifestInvalid):
        await store.import_specs(failing(), source=SOURCE)
    assert indexes() == fresh
    with raw(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.parametrize("first", [True, False], ids=["first_import", "later_import"])
async def test_a_cancelled_import_stops_pulling_rows_and_writes_nothing(
    db: Path, store: JobStore, first: bool
) -> None:
    """SQLite pulls the rows on its own thread; a cancelled import (Ctrl-C) must stop it there
    too. The manifest never ends: if the import did not stop, this test would hang."""
    if not first:
        await store.import_specs(specs(["keep"]), source=SOURCE)
    before = table(db)
    pulled = 0
    under_way = threading.Event()
    closed = threading.Event()

    def endless() -> Iterator[JobSpec]:
        nonlocal pulled
        try:
            while True:
                yield spec(f"job{pulled:09d}", line=pulled + 2)
                pulled += 1
                if pulled == 10_000:
                    under_way.set()
        finally:
            closed.set()  # stopped and closed, not left suspended

    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(store.import_specs, endless(), source=SOURCE))
        await anyio.to_thread.run_sync(under_way.wait)
        tg.cancel_scope.cancel()
    await anyio.to_thread.run_sync(closed.wait)  # the database thread stopped pulling rows
    assert table(db) == before
    report = await store.import_specs(specs(["keep", "new"]), source=SOURCE)
    assert (report.total, report.added) == (2, 2 if first else 1)


@pytest.mark.parametrize("first", [True, False], ids=["first_import", "later_import"])
@pytest.mark.parametrize(
    "dupe",
    [spec("a", line=9), spec("z", line=9, output="A.png")],
    ids=["same_id", "same_output"],
)
async def test_duplicates_the_parser_let_through_write_nothing(
    db: Path, store: JobStore, first: bool, dupe: JobSpec
) -> None:
    """The manifest parser refuses duplicates; if one slips through, the store still
    writes nothing (a constraint stops the import) rather than half an import."""
    if not first:
        await store.import_specs(specs(["keep"]), source=SOURCE)
    before = table(db)
    with pytest.raises(JobStoreError):
        await store.import_specs([*specs(["a", "b", "c"]), dupe], source=SOURCE)
    assert table(db) == before


async def test_manifest_order_is_claim_order(store: JobStore) -> None:
    ids = ["zulu", "alpha", "mike", "bravo", "yankee", "charlie", "echo", "delta"]
    await store.import_specs(specs(ids), source=SOURCE)
    await store.import_specs(specs([*ids, "oscar", "kilo"]), source=SOURCE)
    order = [c.id for c in await store.claim(limit=5, lease_seconds=60)]
    order += [c.id for c in await store.claim(limit=1, lease_seconds=60)]
    order += [c.id for c in await store.claim(limit=10, lease_seconds=60)]
    assert order == [*ids, "oscar", "kilo"]


# --------------------------------------------------------------------------- reads


async def test_get_returns_the_public_record(store: JobStore, clock: FakeClock) -> None:
    await store.import_specs([spec("a", line=7, prompt_extend=True)], source=SOURCE)
    assert await store.get("missing") is None
    rec = await store.get("a")
    assert rec is not None
    assert rec["id"] == "a" and rec["line"] == 7 and rec["state"] == "pending"
    assert rec["prompt_extend"] is True
    assert rec["cost"] == "0"
    assert rec["created_at"] == clock.now
    for hidden in ("claim_token", "worker", "output_key", "cost_micros"):
        assert hidden not in rec
    [claim] = await store.claim(limit=1, lease_seconds=60, worker="w1")
    await store.record_generated("a", claim.token, generated(cost="0.25"), lease_seconds=60)
    rec = await store.get("a")
    assert rec is not None
    assert rec["state"] == "generated"
    assert Decimal(rec["cost"]) == Decimal("0.25")
    assert "claim_token" not in rec and "worker" not in rec


@pytest.mark.parametrize("batch", [1, 6, 7, 49, 50, 2000])
async def test_iter_records_streams_everything_in_manifest_order(
    store: JobStore, batch: int
) -> None:
    ids = [f"{(i * 37) % 101:03d}-job" for i in range(49)]  # not sorted by id
    await store.import_specs(specs(ids), source=SOURCE)
    got = [rec["id"] async for rec in store.iter_records(batch=batch)]
    assert got == ids


async def test_iter_records_by_state_across_batches(store: JobStore) -> None:
    ids = [f"job{i:03d}" for i in range(60)]
    await store.import_specs(specs(ids), source=SOURCE)
    claims = await store.claim(limit=60, lease_seconds=60)
    token = claims[0].token
    failed = ids[5::10]  # sparse: most batches of the filtered query hold none of them
    for job_id in failed:
        await store.fail(job_id, token, code="InvalidParameter", message="bad")
    got = [r["id"] async for r in store.iter_records(batch=4, state=State.FAILED)]
    assert got == failed
    running = [r["id"] async for r in store.iter_records(batch=4, state=State.RUNNING)]
    assert running == [i for i in ids if i not in failed]
    assert [r async for r in store.iter_records(state=State.DONE)] == []
    everything = [r async for r in store.iter_records(batch=9)]
    assert len(everything) == 60
    assert all("claim_token" not in r for r in everything)


async def test_stats_of_an_empty_store(store: JobStore) -> None:
    stats = await store.stats()
    assert stats.by_state == {s.value: 0 for s in State}
    assert stats.total == 0
    assert stats.errors_by_code == {}
    assert (stats.images_billed, stats.cost, stats.currency) == (0, Decimal(0), None)
    assert (stats.attempts, stats.throttled, stats.ambiguous, stats.regenerated) == (0, 0, 0, 0)
    assert stats.due_pending == 0


async def test_stats_figures(store: JobStore, clock: FakeClock) -> None:
    await store.import_specs(specs("abcdefgh"), source=SOURCE)
    claims = {c.id: c for c in await store.claim(limit=7, lease_seconds=600)}
    tok = claims["a"].token
    # a: done after one regeneration (billed twice)
    await store.record_generated("a", tok, generated(cost="0.04"), lease_seconds=600)
    await store.regenerate("a", tok, code="URLExpired", message="expired")
    claimed = {c.id: c for c in await store.claim(limit=2, lease_seconds=600)}
    assert set(claimed) == {"a", "h"}  # a is due again at once
    await store.release("h", claimed["h"].token)
    again = claimed["a"]
    await store.record_generated("a", again.token, generated(cost="0.04"), lease_seconds=600)
    await store.complete("a", again.token, stored("a"))
    # b, c: failed with two codes; d: failed with the same code as b
    await store.fail("b", tok, code="InvalidParameter", message="bad size")
    await store.fail("c", tok, code="DataInspectionFailed", message="refused")
    await store.fail("d", tok, code="InvalidParameter", message="bad size", charge_attempt=False)
    # e: throttled, due later; f: ambiguous, due now
    await store.retry_later("e", tok, delay=30, code="Throttling", message="429", throttled=True)
    await store.retry_later("f", tok, delay=0, code=None, message="lost", ambiguous=True)
    # g: generated, waiting for its download
    await store.record_generated("g", tok, generated(cost="0.02"), lease_seconds=600)
    # h: pending, never claimed
    stats = await store.stats()
    assert stats.by_state == {
        "pending": 3,  # e, f, h
        "running": 0,
        "generated": 1,
        "done": 1,
        "failed": 3,
        "submitted": 0,
        "withdrawn": 0,
    }
    assert stats.count(State.FAILED) == 3
    assert stats.total == 8
    assert stats.errors_by_code == {"InvalidParameter": 2, "DataInspectionFailed": 1}
    assert stats.images_billed == 3
    assert stats.cost == Decimal("0.10")
    assert stats.currency == "CNY"
    # a: 2 generations; b, c: 1 each; d: 0; e, f: 1 each; g: 1
    assert stats.attempts == 7
    assert (stats.throttled, stats.ambiguous, stats.regenerated) == (1, 1, 1)
    assert stats.due_pending == 2  # f and h; e waits 30 s
    clock.advance(30)
    assert (await store.stats()).due_pending == 3


# ------------------------------------------------------------------------------- lanes


async def test_a_job_records_its_lane_and_a_run_its_figures_per_lane(store: JobStore) -> None:
    from dataclasses import replace

    from jobs import LaneCalls

    await store.import_specs(specs(["a", "b"]), source=SOURCE)
    claims = {c.id: c for c in await store.claim(limit=2, lease_seconds=60)}
    await store.record_generated(
        "a", claims["a"].token, replace(generated(), lane="team-a"), lease_seconds=60
    )
    await store.record_submitted(
        "b", claims["b"].token, task_id="t-1", request_id=None, lease_seconds=60, lane="team-b"
    )
    assert (await store.get("a") or {})["lane"] == "team-a"
    assert (await store.get("b") or {})["lane"] == "team-b"
    row = LaneCalls(run="r1", lane="team-a", model="z-image-turbo", quota=2.0, calls=3)
    await store.save_lane_calls([row], worker="w", started_at=T0)
    later = replace(row, calls=5, accepted=4, throttled=1, images=4, cost=Decimal("0.06"),
                    currency="USD", first_accepted_at=T0, last_accepted_at=T0 + 2)  # fmt: skip
    other = replace(row, run="r2", lane="team-b", calls=2)
    await store.save_lane_calls([later, other], worker="w", started_at=T0 + 1)
    assert await store.lane_calls() == (later, other)  # the run's row replaced, not added
    assert (await store.stats()).lanes == (later, other)
