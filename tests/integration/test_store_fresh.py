"""A new SQLite store opened with ``stage=True`` (plan and run): made as ``batcher.db.tmp``
with no journal and no fsync, linked into place whole once its first import has committed
(see jobs.backends.fresh). Killed mid-import through the CLI: test_big_import_cli.py."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from jobs.backends.fresh import temp_path
from jobs.errors import ManifestError, ManifestInvalid, StoreUnavailable
from jobs.spec import JobSpec
from jobs.store import JobStore
from tests.support import whole_db_jobs

from .store_support import FakeClock, numbered, specs

pytestmark = [pytest.mark.anyio, pytest.mark.sqlite_only]

SOURCE = "catalog.csv"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_a_first_import_is_made_aside_and_published_whole(tmp_path: Path) -> None:
    db = tmp_path / "run" / "batcher.db"
    store = await JobStore.open(db, stage=True, clock=FakeClock())
    try:
        assert names(db.parent) == ["batcher.db.tmp"]  # nothing at db until the import is in
        report = await store.import_specs(numbered(300), source=SOURCE)
        assert report.added == 300
        assert names(db.parent) == ["batcher.db"]  # the temporary name is gone
        assert whole_db_jobs(db) == 300
        # The store goes on in the published file, as any store of an existing one (WAL).
        await store.set_meta("after", "yes")
        assert await store.count() == 300
    finally:
        await store.close()
    async with await JobStore.open(db, create=False) as again:
        assert await again.get_meta("after") == "yes"
        assert await again.count() == 300


async def test_a_store_closed_before_importing_publishes_its_schema(tmp_path: Path) -> None:
    db = tmp_path / "batcher.db"
    async with await JobStore.open(db, stage=True) as store:
        await store.set_meta("k", "v")
    assert names(tmp_path) == ["batcher.db"]
    assert whole_db_jobs(db) == 0
    async with await JobStore.open(db, create=False) as store:
        assert await store.get_meta("k") == "v"


async def test_a_failed_first_import_publishes_the_empty_table(tmp_path: Path) -> None:
    """The rollback works without a journal file (the journal is in memory): the folder ends
    as an import that failed always left it, an empty table."""
    db = tmp_path / "batcher.db"
    problem = ManifestInvalid([ManifestError(SOURCE, 20_002, "seed", "not a number")])

    def manifest() -> Iterator[JobSpec]:
        yield from numbered(20_000)
        raise problem

    async with await JobStore.open(db, stage=True) as store:
        with pytest.raises(ManifestInvalid):
            await store.import_specs(manifest(), source=SOURCE)
    assert names(tmp_path) == ["batcher.db"]
    assert whole_db_jobs(db) == 0
    async with await JobStore.open(db, stage=True) as store:
        assert (await store.import_specs(specs(["a", "b"]), source=SOURCE)).added == 2
    assert whole_db_jobs(db) == 2


async def test_a_leftover_temporary_file_is_made_again_from_nothing(tmp_path: Path) -> None:
    """A process killed mid-import left its file (whatever it holds): never opened as the
    database, it is emptied and made again."""
    db = tmp_path / "batcher.db"
    temp = temp_path(db)
    temp.write_bytes(b"SQLite format 3\x00" + os.urandom(50_000))
    temp.with_name(temp.name + "-journal").write_bytes(b"junk")
    async with await JobStore.open(db, stage=True) as store:
        assert (await store.import_specs(numbered(10), source=SOURCE)).added == 10
    assert names(tmp_path) == ["batcher.db"]
    assert whole_db_jobs(db) == 10


async def test_a_leftover_name_of_the_published_file_is_removed(tmp_path: Path) -> None:
    """Killed between the link and the removal of the temporary name: both name one file.
    The next open removes the name only."""
    db = tmp_path / "batcher.db"
    async with await JobStore.open(db, stage=True) as store:
        await store.import_specs(numbered(5), source=SOURCE)
    os.link(db, temp_path(db))
    async with await JobStore.open(db, stage=True) as store:
        assert await store.count() == 5
    assert names(tmp_path) == ["batcher.db"]
    assert whole_db_jobs(db) == 5


async def test_a_second_store_waits_for_the_first_to_publish(tmp_path: Path) -> None:
    """Two processes making one new run folder (a plan and a run): the second waits, then
    opens what the first published and merges into it, as it waited for its write lock."""
    db = tmp_path / "batcher.db"
    first = await JobStore.open(db, stage=True)
    opened: list[JobStore] = []

    async def second() -> None:
        opened.append(await JobStore.open(db, stage=True))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.3)
            assert not opened  # waiting for the first one's file
            await first.import_specs(specs(["a", "b"]), source=SOURCE)
        report = await opened[0].import_specs(specs(["b", "c"]), source=SOURCE)
        assert (report.added, report.unchanged) == (1, 1)
    finally:
        await first.close()
        for store in opened:
            await store.close()
    assert names(tmp_path) == ["batcher.db"]
    assert whole_db_jobs(db) == 3


async def test_a_file_that_appears_meanwhile_is_never_replaced(tmp_path: Path) -> None:
    """Something that does not wait (another program) made batcher.db meanwhile: the import
    fails in one message and that file stays as it is."""
    db = tmp_path / "batcher.db"
    store = await JobStore.open(db, stage=True)
    try:
        db.write_bytes(b"theirs")
        with pytest.raises(StoreUnavailable, match="appeared while"):
            await store.import_specs(numbered(3), source=SOURCE)
    finally:
        await store.close()
    assert db.read_bytes() == b"theirs"
    assert names(tmp_path) == ["batcher.db"]


async def test_an_empty_file_a_reader_made_meanwhile_is_replaced(tmp_path: Path) -> None:
    """A reader that looks before the import is in (a monitoring script, the sqlite3 shell)
    leaves an empty batcher.db: nothing to keep, the import is published over it."""
    db = tmp_path / "batcher.db"
    async with await JobStore.open(db, stage=True) as store:
        sqlite3.connect(db).close()
        assert db.stat().st_size == 0
        assert (await store.import_specs(numbered(4), source=SOURCE)).added == 4
    assert names(tmp_path) == ["batcher.db"]
    assert whole_db_jobs(db) == 4
