"""A run folder made by an older batcher opens with this one: migrated in place, copied aside
first, in one transaction. ``tests/data/v1_run`` is a real version-1 run folder, made by the
release before schema versioning moved on (5 done, 1 failed, 1 pending)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs import migrations, schema
from jobs.errors import SchemaMismatch
from jobs.manifest import open_manifest
from jobs.states import State
from jobs.store import JobStore

from ..pgsupport import fresh, pg_call, query
from ..support import REPO

pytestmark = pytest.mark.anyio

FIXTURE = REPO / "tests" / "data" / "v1_run"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of the version-1 run folder (the fixture itself is never written)."""
    dest = tmp_path / "v1"
    shutil.copytree(FIXTURE, dest)
    return dest


def columns(db: Path, table: str) -> list[str]:
    with sqlite3.connect(db) as con:
        return sorted(r[1] for r in con.execute(f"PRAGMA table_info({table})"))


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def version(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return str(con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])


def test_the_fixture_is_version_1(tmp_path: Path) -> None:
    # read from a copy: opening the fixture itself makes (and, when the connection is
    # collected, removes) files beside it, under the next test's copytree
    db = tmp_path / "batcher.db"
    shutil.copyfile(FIXTURE / "run" / "batcher.db", db)
    assert version(db) == "1"
    assert "endpoint" not in columns(db, "jobs")


async def test_a_version_1_folder_migrates_in_place_and_keeps_every_job(v1: Path) -> None:
    db = v1 / "run" / "batcher.db"
    with sqlite3.connect(db) as con:
        before = con.execute(
            "SELECT id, state, sha256, cost_micros FROM jobs ORDER BY id"
        ).fetchall()
    async with await JobStore.open(db, create=False) as store:
        stats = await store.stats()
        assert stats.total == 7
        assert stats.count(State.DONE) == 5
        assert stats.count(State.FAILED) == 1
        assert stats.count(State.PENDING) == 1
    assert version(db) == str(schema.SCHEMA_VERSION)
    with sqlite3.connect(db) as con:
        after = con.execute(
            "SELECT id, state, sha256, cost_micros FROM jobs ORDER BY id"
        ).fetchall()
    assert after == before
    # the copy aside is the untouched version-1 database
    backup = migrations.backup_path(db, 1)
    assert backup.is_file()
    assert version(backup) == "1"
    with sqlite3.connect(backup) as con:
        assert con.execute("SELECT count(*) FROM jobs").fetchone()[0] == 7


async def test_a_migrated_database_has_the_columns_of_a_new_one(v1: Path, tmp_path: Path) -> None:
    old = v1 / "run" / "batcher.db"
    async with await JobStore.open(old, create=False):
        pass
    new = tmp_path / "new" / "batcher.db"
    async with await JobStore.open(new):
        pass
    tables = ("jobs", "job_images", "job_history", "meta", "lane_calls")
    for table in (*tables, "quota_schedule", "quota_sends"):
        assert columns(old, table) == columns(new, table), table
    assert "lane" in columns(old, "jobs")


async def test_opening_again_does_not_migrate_or_back_up_again(v1: Path) -> None:
    db = v1 / "run" / "batcher.db"
    async with await JobStore.open(db, create=False):
        pass
    backup = migrations.backup_path(db, 1)
    stamp = backup.stat().st_mtime_ns
    async with await JobStore.open(db, create=False) as store:
        assert (await store.stats()).total == 7
    assert backup.stat().st_mtime_ns == stamp
    assert [p.name for p in db.parent.glob("*.bak")] == [backup.name]


async def test_a_failing_step_leaves_version_1_intact(
    v1: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = v1 / "run" / "batcher.db"
    broken = {
        **migrations.STEPS,
        2: (*migrations.STEPS[2], "ALTER TABLE no_such_table ADD COLUMN x TEXT"),
    }
    monkeypatch.setattr(migrations, "STEPS", broken)
    with pytest.raises(Exception, match="no_such_table"):
        await JobStore.open(db, create=False)
    assert version(db) == "1"
    assert "endpoint" not in columns(db, "jobs")  # the step's earlier statements rolled back
    monkeypatch.undo()
    async with await JobStore.open(db, create=False) as store:
        assert (await store.stats()).total == 7
    assert version(db) == str(schema.SCHEMA_VERSION)


async def test_a_newer_database_is_refused_not_downgraded(v1: Path) -> None:
    db = v1 / "run" / "batcher.db"
    with sqlite3.connect(db) as con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(SchemaMismatch, match="newer batcher"):
        await JobStore.open(db, create=False)
    assert version(db) == "99"


async def test_step_4_gives_old_jobs_one_image_no_parameters_and_no_task(v1: Path) -> None:
    db = v1 / "run" / "batcher.db"
    async with await JobStore.open(db, create=False):
        pass
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT DISTINCT n, params, task_id FROM jobs").fetchall()
    assert rows == [(1, None, None)]


async def test_step_7_adds_the_images_table_and_old_jobs_keep_one_file_each(v1: Path) -> None:
    db = v1 / "run" / "batcher.db"
    async with await JobStore.open(db, create=False) as store:
        assert await store.done_images() == 5
        records = [r async for r in store.iter_records(state=State.DONE)]
        assert len(records) == 5
        assert all("images" not in r and r["shortfall"] is None for r in records)
    assert "job_images" in tables(db)
    assert "shortfall" in columns(db, "jobs")


async def test_the_old_manifest_imports_into_the_migrated_folder_unchanged(v1: Path) -> None:
    # Same ids, same content: the manifest's jobs are all "unchanged", nothing is redone.
    db = v1 / "run" / "batcher.db"
    manifest = v1 / "manifest.jsonl"
    async with await JobStore.open(db, create=False) as store:
        report = await store.import_rows(
            open_manifest(manifest, rules=RULES).rows(), source=str(manifest)
        )
        assert (report.added, report.replaced, report.unchanged) == (0, 0, 7)
        assert (await store.stats()).count(State.DONE) == 5


async def test_version_1_images_from_the_loopback_are_marked_emulated(v1: Path) -> None:
    """Version 1 did not record endpoints; an image whose URL was on 127.0.0.1 or localhost
    came from an emulator, so the migration marks it: it never counts as a paid image."""
    db = v1 / "run" / "batcher.db"
    async with await JobStore.open(db, create=False) as store:
        assert await store.endpoints() == {"emulator": 5}
        stats = await store.stats()
        assert stats.images_billed == 0 and stats.images_emulated == 5
    with sqlite3.connect(db) as con:
        rows = dict(con.execute("SELECT id, endpoint FROM jobs").fetchall())
    assert sorted(k for k, v in rows.items() if v is None) == ["6f0c42c9dee04352", "灯笼"]


async def test_the_migrated_claim_index_covers_the_submitted_state(v1: Path) -> None:
    db = v1 / "run" / "batcher.db"
    async with await JobStore.open(db, create=False):
        pass
    with sqlite3.connect(db) as con:
        (ddl,) = con.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ix_jobs_active'"
        ).fetchone()
    assert schema.ACTIVE_SQL in ddl and "'submitted'" in ddl


async def test_a_version_3_postgresql_table_migrates_to_the_latest(tmp_path: Path) -> None:
    """A table made by the release before the model registry (version 3: no n, params,
    task_id; its claim index without the submitted state) is upgraded in place on open."""
    url = fresh()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": "q"}\n')
    async with await JobStore.open(url) as store:
        await store.import_rows(open_manifest(manifest, rules=RULES).rows(), source="m.jsonl")
    old_active = "state IN ('pending', 'running', 'generated')"

    async def downgrade() -> None:
        import asyncpg

        con = await asyncpg.connect(url, timeout=5)
        try:
            await con.execute(
                "ALTER TABLE jobs DROP COLUMN n, DROP COLUMN params, DROP COLUMN task_id, "
                "DROP COLUMN task_submitted_at, DROP COLUMN lane, DROP COLUMN shortfall"
            )
            await con.execute("DROP TABLE lane_calls")
            await con.execute("DROP TABLE job_images")
            await con.execute("DROP INDEX ix_jobs_due")
            await con.execute(
                f"CREATE INDEX ix_jobs_due ON jobs (state, next_attempt_at, seq) WHERE {old_active}"
            )
            await con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        finally:
            await con.close()

    pg_call(downgrade)
    async with await JobStore.open(url, create=False) as store:
        assert (await store.stats()).count(State.PENDING) == 2
        claims = await store.claim(limit=5, lease_seconds=60)
        assert sorted(c.id for c in claims) == ["a", "b"]
        assert {(c.n, c.params, c.task_id) for c in claims} == {(1, None, None)}
    [meta] = query(url, "SELECT value FROM meta WHERE key = 'schema_version'")
    assert meta["value"] == str(schema.SCHEMA_VERSION)
    [index] = query(url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_jobs_due'")
    assert "submitted" in index["indexdef"]
    lane_columns = query(
        url,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'lane_calls' "
        "ORDER BY column_name",
    )
    assert sorted(r["column_name"] for r in lane_columns) == sorted(
        c.name for c in schema.lane_calls.columns
    )
    [lane] = query(
        url,
        "SELECT count(*) AS n FROM information_schema.columns WHERE table_name = 'jobs' "
        "AND column_name = 'lane'",
    )
    assert lane["n"] == 1
    # step 7: a job of one image has no shortfall, and the table of several images is there
    assert query(url, "SELECT count(*) AS c FROM job_images") == [{"c": 0}]
    assert {r["shortfall"] for r in query(url, "SELECT shortfall FROM jobs")} == {None}


# The claim index's condition as versions 4 to 7 wrote it (version 8 writes it with OR).
V7_ACTIVE = "state IN ('pending', 'running', 'generated', 'submitted')"


def claim_plan(db: Path) -> str:
    """SQLite's plan of the claim's query for pending jobs, as one line."""
    from jobs.backends.sqlite import _CLAIM_PENDING

    with sqlite3.connect(db) as con:
        rows = con.execute("EXPLAIN QUERY PLAN " + _CLAIM_PENDING, (1e12, 64)).fetchall()
    return "; ".join(str(r[3]) for r in rows)


async def test_a_version_7_file_migrates_to_the_or_index_and_claims_still_use_it(
    tmp_path: Path,
) -> None:
    """A folder of version 7 (its claim index written with IN, 99% of its jobs done): opened,
    it is copied aside, its index is built again with the condition the claims now repeat, and
    a claim reads that index (no scan) and takes the right jobs. (SQLite 3.40 would read the
    old index for the new queries too, rewriting their OR as the index's IN; the step keeps a
    migrated file's index the same as a new file's, which the claims are written against.)"""
    db = tmp_path / "run" / "batcher.db"
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,prompt\n" + "".join(f"j{i:04d},p {i}\n" for i in range(1000)))
    async with await JobStore.open(db) as store:
        await store.import_rows(open_manifest(manifest, rules=RULES).rows(), source="m.csv")
    with sqlite3.connect(db) as con:  # what a version-7 batcher left: its index, its version
        con.execute("UPDATE jobs SET state = 'done' WHERE id >= 'j0010'")
        con.execute("DROP INDEX ix_jobs_active")
        con.execute(
            f"CREATE INDEX ix_jobs_active ON jobs (state, next_attempt_at) WHERE {V7_ACTIVE}"
        )
        con.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    async with await JobStore.open(db, create=False) as store:
        claims = await store.claim(limit=64, lease_seconds=60)
        assert [c.id for c in claims] == [f"j{i:04d}" for i in range(10)]
        stats = await store.stats()
        assert (stats.count(State.DONE), stats.count(State.RUNNING)) == (990, 10)
    assert version(db) == "8" == str(schema.SCHEMA_VERSION)
    assert version(migrations.backup_path(db, 7)) == "7"
    with sqlite3.connect(db) as con:
        (ddl,) = con.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'ix_jobs_active'"
        ).fetchone()
    assert schema.ACTIVE_SQL in ddl and " IN " not in ddl
    assert "USING INDEX ix_jobs_active (state=? AND next_attempt_at<?)" in claim_plan(db)
    # The claim's UPDATE takes its chosen ids by key: ``state = 'pending'`` implies the OR
    # index's condition, and reading every pending job from the index was a scan of 1% of
    # the table per claim (20-70 ms at 1M jobs).
    from jobs.backends.sqlite import _TAKE_PENDING

    ids = [f"j{i:04d}" for i in range(10, 74)]
    take = _TAKE_PENDING.format(marks=", ".join("?" * len(ids)))
    with sqlite3.connect(db) as con:
        con.execute("UPDATE jobs SET state = 'pending' WHERE id < 'j0500'")  # many pending
        plan = con.execute("EXPLAIN QUERY PLAN " + take, ("t", 1.0, "w", 1.0, *ids)).fetchall()
    assert [str(r[3]) for r in plan] == ["SEARCH jobs USING INDEX sqlite_autoindex_jobs_1 (id=?)"]


async def test_a_version_7_postgresql_table_migrates_and_keeps_its_in_index(
    tmp_path: Path,
) -> None:
    """PostgreSQL keeps the claim index's IN form across version 8: with the OR form its
    planner reads every pending job through one bitmap scan per state and sorts them for each
    claim (0.75 s a claim at a million pending, measured), where the IN form reads the first
    rows of the index in order."""
    url = fresh()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"id": "j{i}", "prompt": "p"}}\n' for i in range(3)))
    async with await JobStore.open(url) as store:
        await store.import_rows(open_manifest(manifest, rules=RULES).rows(), source="m.jsonl")

    async def downgrade() -> None:
        import asyncpg

        con = await asyncpg.connect(url, timeout=5)
        try:
            await con.execute("DROP INDEX ix_jobs_due")
            await con.execute(
                f"CREATE INDEX ix_jobs_due ON jobs (state, next_attempt_at, seq) WHERE {V7_ACTIVE}"
            )
            await con.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
        finally:
            await con.close()

    pg_call(downgrade)
    async with await JobStore.open(url, create=False) as store:
        claims = await store.claim(limit=5, lease_seconds=60)
        assert sorted(c.id for c in claims) == ["j0", "j1", "j2"]
    [meta] = query(url, "SELECT value FROM meta WHERE key = 'schema_version'")
    assert meta["value"] == "8"
    [index] = query(url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_jobs_due'")
    assert "ANY" in index["indexdef"] and " OR " not in index["indexdef"]
    # the claim's query reads the index in order: no bitmap of each state, no sort
    from jobs.backends.postgres import _TAKE_PENDING

    async def plan() -> str:
        import asyncpg

        con = await asyncpg.connect(url, timeout=5)
        try:
            await con.execute("SET enable_seqscan = off")
            sql = str(_TAKE_PENDING).replace(":token", "'t'").replace(":lease", "1.0")
            sql = sql.replace(":worker", "'w'").replace(":now", "1e12").replace(":limit", "16")
            rows = await con.fetch("EXPLAIN " + sql)
        finally:
            await con.close()
        return "\n".join(r[0] for r in rows)

    found = pg_call(plan)
    assert "Index Scan using ix_jobs_due" in found, found
    assert "BitmapOr" not in found and "Sort" not in found, found
