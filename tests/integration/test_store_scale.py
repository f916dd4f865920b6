"""Claiming from a big table that is 99% done reads the partial index, not the whole table.

No timing asserts here: the plan is what decides whether the claim stays fast as the table
grows (the figures themselves belong in bench/). The statements checked are the ones the store
really sends, captured on their way to SQLite, with their real parameters.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobs.backends import sqlite as store_module
from jobs.store import JobStore

from .store_support import FakeClock, numbered, raw

pytestmark = pytest.mark.anyio

ROWS = 200_000
EVERY = 100  # one job in a hundred is still to do


@pytest.fixture
async def big(tmp_path: Path) -> AsyncIterator[tuple[JobStore, Path]]:
    db = tmp_path / "batcher.db"
    store = await JobStore.open(db, clock=FakeClock())
    try:
        report = await store.import_specs(numbered(ROWS), source="big.csv")
        assert report.added == ROWS
        with raw(db) as con:
            con.execute(
                "UPDATE jobs SET state = 'done', sha256 = 'x', finished_at = 1 "
                f"WHERE (rowid - 1) % {EVERY} != 0"
            )
        yield store, db
    finally:
        await store.close()


def plan(db: Path, statement: str, params: Any) -> list[str]:
    with raw(db) as con:
        return [r["detail"] for r in con.execute("EXPLAIN QUERY PLAN " + statement, params)]


def assert_uses_active_index(db: Path, statement: str, params: Any) -> None:
    details = plan(db, statement, params)
    assert any("USING INDEX ix_jobs_active" in d for d in details), (statement, details)
    assert not any(d.startswith("SCAN") for d in details), (statement, details)
    assert not any("TEMP B-TREE" in d for d in details), (statement, details)


async def test_claim_reads_the_partial_index(big: tuple[JobStore, Path]) -> None:
    store, db = big
    stats = await store.stats()
    assert stats.by_state["pending"] == ROWS // EVERY
    assert stats.by_state["done"] == ROWS - ROWS // EVERY
    todo = [f"job{i:06d}" for i in range(0, ROWS, EVERY)]
    for round_ in range(2):
        if round_ == 1:  # with table statistics the planner may choose differently: check both
            with raw(db) as con:
                con.execute("ANALYZE")
        claims = await store.claim(limit=8, lease_seconds=60)
        # the next ones, in manifest order
        assert [c.id for c in claims] == todo[8 * round_ : 8 * round_ + 8]
        # the claim's two SELECTs, as store.claim sends them (plain SQL on the driver thread)
        now = time.time()
        assert_uses_active_index(db, store_module._CLAIM_PENDING, (now, 8))
        for state in ("generated", "submitted"):
            assert_uses_active_index(db, store_module._CLAIM_LEASED, (state, now, now, 8))
