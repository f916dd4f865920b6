"""A scratch PostgreSQL database for a benchmark: made at the start, dropped at the end.

The server is the one in ``BATCHER_BENCH_PG`` (an admin URL, by default the local server's
``postgres`` database); the scratch database gets a random name beside it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg

__all__ = ["ADMIN", "scratch_database"]

ADMIN = os.environ.get("BATCHER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _admin(*statements: str) -> None:
    con = await asyncpg.connect(ADMIN, timeout=10)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


@contextmanager
def scratch_database() -> Iterator[str]:
    """Create a database of a random name; yield its URL; drop it (with its sessions) after."""
    name = f"batcher_bench_{secrets.token_hex(4)}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        yield f"{ADMIN.rpartition('/')[0]}/{name}"
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
