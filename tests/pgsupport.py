"""A real PostgreSQL for the tests (no tests here).

The server is the one at 127.0.0.1:5432 (trust auth), or the one ``BATCHER_TEST_PG_ADMIN``
names (a URL of a database to connect to for ``CREATE DATABASE``). The first test that needs
it creates a database of its own, ``batcher_test_<random>``; it is dropped when the session
ends (:func:`drop_session_database`, called by ``tests/conftest.py``). Each test starts from an
empty schema (:func:`fresh`).

In CI (``CI=true``) a test needing PostgreSQL fails when the server cannot be reached; elsewhere
it is skipped, with the reason.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import pytest

__all__ = ["ADMIN", "drop_session_database", "fresh", "pg_call", "query", "require_database"]

_T = TypeVar("_T")
ADMIN = os.environ.get("BATCHER_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
_state: dict[str, Any] = {}
_lock = threading.Lock()


def pg_call(fn: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``fn()`` to completion on an event loop of its own, in a thread (callable from
    sync code and from inside a running loop alike)."""
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["value"] = asyncio.run(fn())  # type: ignore[arg-type]
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


async def _execute(url: str, *statements: str) -> None:
    con = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await con.execute(statement)
    finally:
        await con.close()


def _url_of(name: str) -> str:
    base, _, _ = ADMIN.rpartition("/")
    return f"{base}/{name}"


def require_database() -> str:
    """The URL of this session's test database, created on first use; skip (or, in CI,
    fail) when the server cannot be reached."""
    with _lock:
        if "url" in _state:
            return str(_state["url"])
        if "unreachable" in _state:
            _unreachable(str(_state["unreachable"]))
        name = f"batcher_test_{secrets.token_hex(6)}"
        try:
            pg_call(lambda: _execute(ADMIN, f"CREATE DATABASE {name}"))
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            _state["unreachable"] = f"PostgreSQL not reachable at {ADMIN}: {exc}"
            _unreachable(str(_state["unreachable"]))
        _state["name"] = name
        _state["url"] = _url_of(name)
        return str(_state["url"])


def _unreachable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the PostgreSQL tests must run)")
    pytest.skip(reason)


def fresh() -> str:
    """The test database with an empty ``public`` schema: a new run's table."""
    url = require_database()
    pg_call(lambda: _execute(url, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public"))
    return url


def drop_session_database() -> None:
    """Drop the database this session created, if any."""
    name = _state.pop("name", None)
    _state.pop("url", None)
    if name is not None:
        pg_call(lambda: _execute(ADMIN, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def query(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of ``sql`` (``$1`` parameters) as dicts."""

    async def run() -> list[dict[str, Any]]:
        con = await asyncpg.connect(url, timeout=5)
        try:
            return [dict(r) for r in await con.fetch(sql, *args)]
        finally:
            await con.close()

    return pg_call(run)
