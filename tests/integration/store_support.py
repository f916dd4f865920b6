"""Shared helpers for the JobStore tests (no tests here): a fake clock, specs, raw reads.

Raw reads go through the plain ``sqlite3`` module on the same file, so a test sees what is on
disk, including the columns the store keeps to itself (claim token, worker, output key).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from jobs.spec import JobSpec
from jobs.store import Generated, StoredFile

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


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the store's file, closed on exit."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=30)) as con:
        con.row_factory = sqlite3.Row
        yield con


def row(path: Path, job_id: str) -> dict[str, Any]:
    """Every column of one job as it is on disk."""
    with raw(path) as con:
        found = con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert found is not None, f"no job {job_id!r}"
    return dict(found)


def table(path: Path) -> list[dict[str, Any]]:
    """The whole jobs table in rowid (manifest) order."""
    with raw(path) as con:
        return [dict(r) for r in con.execute("SELECT rowid AS _rowid, * FROM jobs ORDER BY rowid")]


def states(path: Path) -> dict[str, str]:
    with raw(path) as con:
        return dict(con.execute("SELECT id, state FROM jobs").fetchall())
