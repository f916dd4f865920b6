"""Claiming from a big table that is 99% done reads the partial index, not the whole table.

No timing asserts here: the plan is what decides whether the claim stays fast as the table
grows (the figures themselves belong in bench/). The statements checked are the ones the store
really sends, captured on their way to SQLite, with their real parameters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

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


async def claim_capturing_sql(
    store: JobStore, limit: int
) -> tuple[list[str], list[tuple[str, Any]]]:
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        sent.append((statement, params))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        claims = await store.claim(limit=limit, lease_seconds=60)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    return [c.id for c in claims], sent


def plan(db: Path, statement: str, params: Any) -> list[str]:
    with raw(db) as con:
        return [r["detail"] for r in con.execute("EXPLAIN QUERY PLAN " + statement, params)]


def selects_for(sent: list[tuple[str, Any]], state: str) -> list[tuple[str, Any]]:
    """The claim's SELECTs of one state: the state is their first parameter, or a literal."""

    def first_param(params: Any) -> Any:
        values = list(params.values()) if isinstance(params, dict) else list(params or ())
        return values[0] if values else None

    return [
        (s, p)
        for s, p in sent
        if s.lstrip().upper().startswith("SELECT")
        and (first_param(p) == state or f"state = '{state}'" in s)
    ]


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
        ids, sent = await claim_capturing_sql(store, limit=8)
        assert ids == todo[8 * round_ : 8 * round_ + 8]  # the next ones, in manifest order
        [(pending_sql, pending_params)] = selects_for(sent, "pending")
        assert_uses_active_index(db, pending_sql, pending_params)
        [(generated_sql, generated_params)] = selects_for(sent, "generated")
        assert_uses_active_index(db, generated_sql, generated_params)
