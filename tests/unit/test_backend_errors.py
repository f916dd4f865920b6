"""Driver errors become one StoreUnavailable line: PostgreSQL by SQLSTATE, SQLite by result
code (a pure mapping: the exceptions are built here, no database is reached)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from jobs.backends import PostgresBackend, SQLiteBackend, is_database_url
from jobs.errors import StoreUnavailable, StoreUnreachable

pytestmark = pytest.mark.anyio

URL = "postgresql://batcher:s3cret-pw@db.example.internal:5432/catalog_run"


class _PgError(Exception):
    def __init__(self, sqlstate: str, message: str = "server said no") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "says"),
    [
        ("08006", "cannot reach the job database"),
        ("08001", "cannot reach the job database"),
        ("28P01", "refused the login"),
        ("3D000", "create it first"),
        ("25006", "read-only"),
        ("53100", "disk is full"),
        ("53300", "out of resources"),
        ("57P01", "shutting down or restarting"),
        ("42501", "permissions"),
        ("40P01", "SQLSTATE 40P01"),
    ],
)
async def test_postgresql_errors_are_translated_by_sqlstate(sqlstate: str, says: str) -> None:
    backend = PostgresBackend(URL)
    try:
        for raised in (_PgError(sqlstate), DBAPIError("SELECT 1", {}, _PgError(sqlstate))):
            with pytest.raises(StoreUnavailable) as info, backend.translated():
                raise raised
            message = str(info.value)
            assert says in message and "\n" not in message
            assert "s3cret-pw" not in message  # the URL's password never shows
            assert info.value.__cause__ is raised
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("sqlstate", "lost"),
    [
        ("08006", True),  # connection_failure
        ("08003", True),  # connection_does_not_exist (asyncpg: closed under a statement)
        ("57P01", True),  # admin_shutdown: the server is stopping or restarting
        ("57P02", True),  # crash_shutdown
        ("57P03", True),  # cannot_connect_now: starting up
        ("57014", False),  # query_canceled: not the connection
        ("53300", False),  # too many connections: a limit to raise, not an outage
        ("28P01", False),
        ("40P01", False),
    ],
)
async def test_a_lost_connection_is_store_unreachable_and_nothing_else_is(
    sqlstate: str, lost: bool
) -> None:
    backend = PostgresBackend(URL)
    try:
        for raised in (_PgError(sqlstate), DBAPIError("SELECT 1", {}, _PgError(sqlstate))):
            with pytest.raises(StoreUnavailable) as info, backend.translated():
                raise raised
            assert isinstance(info.value, StoreUnreachable) is lost, sqlstate
    finally:
        await backend.close()


async def test_a_connection_sqlalchemy_found_dead_or_a_socket_error_is_store_unreachable() -> None:
    backend = PostgresBackend(URL)
    closed = DBAPIError("SELECT 1", {}, Exception("closed"), connection_invalidated=True)
    try:
        for raised in (closed, ConnectionResetError(104, "Connection reset by peer")):
            with pytest.raises(StoreUnreachable) as info, backend.translated():
                raise raised
            assert "s3cret-pw" not in str(info.value) and "\n" not in str(info.value)
            assert "db.example.internal:5432" in str(info.value)
    finally:
        await backend.close()


async def test_an_unreachable_server_names_the_url_without_its_password() -> None:
    backend = PostgresBackend(URL)
    try:
        with pytest.raises(StoreUnavailable) as info, backend.translated():
            raise ConnectionRefusedError(111, "Connection refused")
        assert str(info.value) == (
            "cannot reach the job database at "
            "postgresql://batcher:***@db.example.internal:5432/catalog_run: Connection refused"
        )
    finally:
        await backend.close()


async def test_other_errors_are_not_swallowed() -> None:
    backend = PostgresBackend(URL)
    try:
        with pytest.raises(KeyError), backend.translated():
            raise KeyError("a bug, not the database")
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (sqlite3.SQLITE_BUSY, "locked by another process"),
        (sqlite3.SQLITE_LOCKED, "locked by another process"),
        (sqlite3.SQLITE_READONLY, "read-only"),
        (sqlite3.SQLITE_FULL, "disk is full"),
        (sqlite3.SQLITE_CANTOPEN, "could not be opened"),
        (sqlite3.SQLITE_NOTADB, "not a batcher database"),
        (sqlite3.SQLITE_CORRUPT, "not a batcher database"),
        (517, "locked by another process"),  # SQLITE_BUSY_SNAPSHOT: extended codes too
    ],
)
async def test_sqlite_errors_are_translated_by_result_code(
    tmp_path: Path, code: int, says: str
) -> None:
    backend = SQLiteBackend(tmp_path / "batcher.db")  # no connection is made
    try:
        error = sqlite3.OperationalError("whatever the text")
        error.sqlite_errorcode = code
        with pytest.raises(StoreUnavailable, match=says), backend.translated():
            raise error
    finally:
        await backend.close()


def test_database_urls_are_told_from_paths() -> None:
    assert is_database_url("postgresql://u@h/d") and is_database_url("postgres://u@h/d")
    assert not is_database_url("out/catalog/batcher.db")
    assert not is_database_url("mysql://u@h/d")
