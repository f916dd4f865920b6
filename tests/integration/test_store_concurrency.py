"""Two stores on one file, and a write lock held by someone else.

Each JobStore serialises its own writes; between stores (between processes) only SQLite's
locking and ``busy_timeout`` stand. These tests use two stores on one file and a plain
``sqlite3`` connection holding ``BEGIN IMMEDIATE`` in a thread, like another process would.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from sqlalchemy.exc import DBAPIError

from jobs import schema
from jobs.errors import LeaseLost, StoreUnavailable
from jobs.store import JobStore

from .store_support import FakeClock, generated, numbered, row, specs, states, stored

pytestmark = pytest.mark.anyio

LEASE = 60.0


async def test_two_stores_never_hand_one_job_to_both(tmp_path: Path) -> None:
    """Many rounds of workers on two stores draining one table: each job claimed once."""
    db = tmp_path / "batcher.db"
    clock = FakeClock()
    handed: Counter[str] = Counter()
    by_store: Counter[str] = Counter()
    holders: dict[str, str] = {}
    overlaps: list[str] = []
    rng = random.Random(6)
    async with (
        await JobStore.open(db, clock=clock) as one,
        await JobStore.open(db, clock=clock) as two,
    ):

        async def worker(store: JobStore, name: str) -> None:
            while True:
                claims = await store.claim(limit=rng.randint(1, 4), lease_seconds=LEASE)
                if not claims:
                    return
                by_store[name.split("/")[0]] += len(claims)
                for c in claims:
                    handed[c.id] += 1
                    if c.id in holders:
                        overlaps.append(f"{c.id}: {holders[c.id]} and {name}")
                    holders[c.id] = name
                await anyio.lowlevel.checkpoint()  # let the other store's workers in between
                for c in claims:
                    await store.record_generated(c.id, c.token, generated(), lease_seconds=LEASE)
                    await store.complete(c.id, c.token, stored(c.id[-1]))
                    del holders[c.id]

        total = 0
        for round_ in range(8):
            batch = numbered(40, prefix=f"r{round_}-")
            await (one if round_ % 2 else two).import_specs(batch, source="m.csv")
            total += len(batch)
            async with anyio.create_task_group() as tg:
                for n in range(3):
                    tg.start_soon(worker, one, f"one/{n}")
                    tg.start_soon(worker, two, f"two/{n}")
        stats = await two.stats()
    assert overlaps == []
    assert by_store["one"] > 0 and by_store["two"] > 0  # both really took part
    assert len(handed) == total
    assert set(handed.values()) == {1}
    assert stats.by_state["done"] == total
    assert stats.images_billed == total


async def test_two_stores_heartbeat_and_reclaim_against_each_other(tmp_path: Path) -> None:
    """One store's reclaim takes back only what the other let expire."""
    db = tmp_path / "batcher.db"
    clock = FakeClock()
    async with (
        await JobStore.open(db, clock=clock) as one,
        await JobStore.open(db, clock=clock) as two,
    ):
        await one.import_specs(specs(["a", "b"]), source="m.csv")
        [a] = await one.claim(limit=1, lease_seconds=LEASE)
        [b] = await two.claim(limit=1, lease_seconds=LEASE)
        clock.advance(LEASE - 1)
        assert await one.heartbeat(a.token, ["a"], lease_seconds=LEASE) == set()
        clock.advance(2)
        assert await one.reclaim() == 1  # two's b, whose lease ran out
        assert await two.heartbeat(b.token, ["b"], lease_seconds=LEASE) == {"b"}
        assert states(db) == {"a": "running", "b": "pending"}


async def test_concurrent_writes_in_one_store_fence_each_other_alone(tmp_path: Path) -> None:
    """Writes issued together (which the store may commit as one transaction) succeed or
    fail one by one: a stale token's LeaseLost does not take its neighbours' writes down."""
    db = tmp_path / "batcher.db"
    async with await JobStore.open(db, clock=FakeClock()) as store:
        ids = [f"job{i:02d}" for i in range(40)]
        await store.import_specs(specs(ids), source="m.csv")
        claims = await store.claim(limit=40, lease_seconds=LEASE)
        token = claims[0].token
        outcome: dict[str, str] = {}

        async def write(job_id: str, good: bool) -> None:
            try:
                await store.record_generated(
                    job_id, token if good else "stale", generated(), lease_seconds=LEASE
                )
                outcome[job_id] = "applied"
            except LeaseLost:
                outcome[job_id] = "lost"

        async with anyio.create_task_group() as tg:
            for n, job_id in enumerate(ids):
                tg.start_soon(write, job_id, n % 3 != 0)
    expected = {job_id: "applied" if n % 3 else "lost" for n, job_id in enumerate(ids)}
    assert outcome == expected
    assert states(db) == {
        job_id: "generated" if n % 3 else "running" for n, job_id in enumerate(ids)
    }


def hold_write_lock(
    db: Path, seconds: float, locked: threading.Event, sql: str = "", args: tuple = ()
) -> None:
    """Another process: take the write lock, optionally write, hold it, then commit."""
    with closing(sqlite3.connect(db, isolation_level=None, timeout=30)) as con:
        con.execute("BEGIN IMMEDIATE")
        if sql:
            con.execute(sql, args)
        locked.set()
        time.sleep(seconds)
        con.execute("COMMIT")


async def test_a_store_write_waits_for_another_writer_and_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "batcher.db"
    clock = FakeClock()
    async with await JobStore.open(db, clock=clock) as store:
        await store.import_specs(specs(["a", "b"]), source="m.csv")
        locked = threading.Event()
        # The other writer pushes a's retry time far away; if our claim waited for its
        # commit it sees that and takes b, if it had not waited it would take a.
        push = ("UPDATE jobs SET next_attempt_at = ? WHERE id = 'a'", (clock.now + 1e6,))
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, hold_write_lock, db, 1.0, locked, *push)
            assert await anyio.to_thread.run_sync(locked.wait, 10)
            stats = await store.stats()  # WAL: a reader is not blocked by the writer
            assert stats.total == 2
            claims = await store.claim(limit=1, lease_seconds=LEASE)
        assert [c.id for c in claims] == ["b"]
        assert row(db, "b")["claim_token"] == claims[0].token


async def test_a_write_lock_held_past_busy_timeout_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pragmas = tuple(
        "PRAGMA busy_timeout=200" if p.startswith("PRAGMA busy_timeout") else p
        for p in schema.PRAGMAS
    )
    assert pragmas != schema.PRAGMAS
    monkeypatch.setattr(schema, "PRAGMAS", pragmas)
    db = tmp_path / "batcher.db"
    async with await JobStore.open(db, clock=FakeClock()) as store:
        await store.import_specs(specs(["a"]), source="m.csv")
        locked = threading.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, hold_write_lock, db, 2.0, locked)
            assert await anyio.to_thread.run_sync(locked.wait, 10)
            with pytest.raises(StoreUnavailable) as info:
                await store.claim(limit=1, lease_seconds=LEASE)
            message = str(info.value)
            assert "locked" in message
            assert "\n" not in message and "UPDATE" not in message and "SELECT" not in message
            assert isinstance(info.value.__cause__, DBAPIError | sqlite3.Error)
            with pytest.raises(StoreUnavailable, match="locked"):
                await store.import_specs(specs(["a", "b"]), source="m.csv")
        # once the other writer is gone, the same store works again, and nothing was written
        assert states(db) == {"a": "pending"}
        [claim] = await store.claim(limit=1, lease_seconds=LEASE)
        assert claim.id == "a"
