"""Shared helpers for the JobStore tests (no tests here): a fake clock, specs, raw reads.

Raw reads go through the plain ``sqlite3`` module on the same file (or asyncpg, for a store in
PostgreSQL: the target is then its URL), so a test sees what is stored, including the columns
the store keeps to itself (claim token, worker, output key).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from jobs.backends import is_database_url
from jobs.spec import JobSpec
from jobs.store import Generated, StoredFile
from tests.pgsupport import pg_call, query

T0 = 1_700_000_000.0


class FakeClock:
    """A clock the test moves by hand; the store reads it through ``__call__``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spec(job_id: str, *, line: int = 1, prompt: str | None = None, **kw: Any) -> JobSpec:
    """A valid JobSpec; the output follows the id unless given."""
    output = kw.pop("output", f"{job_id}.png")
    values: dict[str, Any] = {
        "id": job_id,
        "model": "z-image-turbo",
        "prompt": prompt if prompt is not None else f"a photo of {job_id}",
        "size": "1024*1024",
        "seed": 42,
        "prompt_extend": False,
        "output": output,
        "output_key": kw.pop("output_key", output.casefold()),
        "line": line,
    }
    values.update(kw)
    return JobSpec(**values)


def specs(ids: Iterable[str], *, first_line: int = 2) -> list[JobSpec]:
    return [spec(i, line=first_line + n) for n, i in enumerate(ids)]


def numbered(n: int, *, prefix: str = "job") -> list[JobSpec]:
    return specs(f"{prefix}{i:06d}" for i in range(n))


def generated(
    *,
    url: str = "https://img.example.invalid/a.png?sig=1",
    expires_at: float | None = T0 + 86_400,
    cost: str = "0.04",
    request_id: str = "req-1",
) -> Generated:
    return Generated(
        request_id=request_id,
        width=1024,
        height=1024,
        image_count=1,
        input_tokens=None,
        output_tokens=None,
        total_tokens=None,
        reasoning_tokens=None,
        actual_prompt="a rewritten prompt",
        image_url=url,
        url_expires_at=expires_at,
        latency_ms=1234.5,
        cost=Decimal(cost),
        currency="CNY",
    )


def stored(tag: str = "x") -> StoredFile:
    return StoredFile(sha256=(tag * 64)[:64], bytes=1000 + len(tag))


def _is_url(path: Path | str) -> bool:
    return isinstance(path, str) and is_database_url(path)


class _PgCursor:
    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class PgRaw:
    """What a test does with ``raw(db)``, on PostgreSQL: ``execute`` with ``?`` parameters,
    rows that index by position and by name (asyncpg records), one statement each."""

    def __init__(self, url: str) -> None:
        self.url = url

    def execute(self, sql: str, params: Iterable[Any] = ()) -> _PgCursor:
        parts = sql.split("?")
        numbered = parts[0] + "".join(f"${n}{p}" for n, p in enumerate(parts[1:], start=1))

        async def run() -> list[Any]:
            con = await asyncpg.connect(self.url, timeout=5)
            try:
                return list(await con.fetch(numbered, *params))
            finally:
                await con.close()

        return _PgCursor(pg_call(run))


@contextmanager
def raw(path: Path | str) -> Iterator[Any]:
    """A plain sqlite3 connection to the store's file (closed on exit), or for a store in
    PostgreSQL a :class:`PgRaw` on its database."""
    if _is_url(path):
        yield PgRaw(path)
        return
    with closing(sqlite3.connect(path, isolation_level=None, timeout=30)) as con:
        con.row_factory = sqlite3.Row
        yield con


def _pg_rows(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    rows = query(url, sql, *args)
    for r in rows:
        r["_rowid"] = r.pop("seq", None)
    return rows


def row(path: Path | str, job_id: str) -> dict[str, Any]:
    """Every column of one job as it is stored."""
    if _is_url(path):
        found_pg = _pg_rows(path, "SELECT * FROM jobs WHERE id = $1", job_id)
        assert found_pg, f"no job {job_id!r}"
        found_pg[0].pop("_rowid")
        return found_pg[0]
    with raw(Path(path)) as con:
        found = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert found is not None, f"no job {job_id!r}"
    return dict(found)


def table(path: Path | str) -> list[dict[str, Any]]:
    """The whole jobs table in rowid (manifest) order."""
    if _is_url(path):
        return _pg_rows(path, "SELECT * FROM jobs ORDER BY seq")
    with raw(Path(path)) as con:
        return [dict(r) for r in con.execute("SELECT rowid AS _rowid, * FROM jobs ORDER BY rowid")]


def states(path: Path | str) -> dict[str, str]:
    if _is_url(path):
        return {r["id"]: r["state"] for r in query(path, "SELECT id, state FROM jobs")}
    with raw(Path(path)) as con:
        return dict(con.execute("SELECT id, state FROM jobs").fetchall())
