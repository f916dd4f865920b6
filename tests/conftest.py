"""Shared fixtures: every async test runs on asyncio through anyio's pytest plugin; a store
test that asks for ``backend`` runs on SQLite and on a real PostgreSQL (``tests/pgsupport``),
unless marked ``sqlite_only``.

``make test`` runs the suite in two parts: first every test not marked ``serial``, several at a
time (pytest-xdist: each worker process has its own PostgreSQL test database and temporary
folders, and every server listens on a port of its own), then the ``serial`` ones alone. A test
is marked ``serial`` (a module's ``pytestmark``, or the test itself) when what it asserts
depends on the machine being otherwise quiet: a rate against a quota, a count of throttled
answers, an elapsed time, a run that must not have finished by the time it is killed; or when
it disturbs the others (it restarts the PostgreSQL server). A new test of that kind must be
marked too: in the parallel part it would pass on a quiet machine and fail now and then on CI.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgsupport import drop_session_database, fresh

# The CLI tests press Ctrl-C as a terminal does (SIGINT). A suite started in the background by
# a non-interactive shell (`nohup make test &`) inherits SIGINT ignored, and so would every
# batcher it starts (an ignored signal stays ignored across exec): they would run on through
# the Ctrl-C. With Python's own handler here, the processes it starts begin with SIGINT's
# default action, as under a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only") is not None
        metafunc.parametrize("backend", ["sqlite"] if only else ["sqlite", "postgres"])


@pytest.fixture(scope="session", autouse=True)
def _postgres_test_database() -> Iterator[None]:
    yield
    drop_session_database()


def store_target(backend: str, path: Path) -> Path | str:
    """Where a test's store lives: the SQLite file ``path``, or an empty PostgreSQL schema."""
    return path if backend == "sqlite" else fresh()
