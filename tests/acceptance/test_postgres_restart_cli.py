"""RESTARTS THE MACHINE'S POSTGRESQL SERVER: two workers of one run, with the real CLI against
the emulator, while the server they share is restarted under them: ``pg_ctlcluster stop``,
2 s down, ``start`` (a bare ``restart`` of a small cluster can be over in a fifth of a second,
before a worker asks anything of it: the pooled connections are then replaced unnoticed).

They pause, reconnect, and finish every job, each generated once. The server is the one
``tests/pgsupport.py`` uses, found among this machine's clusters by its port; the test waits
until it accepts connections again and, whatever happens, leaves it started. Marked ``serial``
as well, so ``make test`` runs it in its part of tests run one at a time: no other test is
connected meanwhile; later tests open new connections. Marked ``pg_restart``
(``-m "not pg_restart"`` leaves it out).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.acceptance.test_postgres_cli import KEY, check_done, manifest, start
from tests.pgsupport import ADMIN, fresh, pg_call, query
from tests.support import run_cli

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.pg_restart, pytest.mark.serial]

CTL = "pg_ctlcluster"
DOWN = 2.0  # s the server stays stopped


def _cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster serving ADMIN's port, or None."""
    parts = urlsplit(ADMIN)
    if parts.hostname not in ("127.0.0.1", "localhost") or shutil.which("pg_lsclusters") is None:
        return None
    listing = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=False
    )
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == str(parts.port or 5432):
            return fields[0], fields[1]
    return None


def _accepts(url: str) -> bool:
    async def ping() -> None:
        con = await asyncpg.connect(url, timeout=2)
        await con.close()

    try:
        pg_call(ping)
    except Exception:  # refused, starting up, reset: any failure means not yet
        return False
    return True


def _wait_up(url: str, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not _accepts(url):
        if time.monotonic() > deadline:
            pytest.fail(f"PostgreSQL did not accept connections again within {within:g}s")
        time.sleep(0.2)


@pytest.fixture
def cluster() -> Iterator[tuple[str, str]]:
    found = _cluster()
    if found is None or shutil.which(CTL) is None:
        pytest.skip(f"no local cluster to restart serves {urlsplit(ADMIN).netloc} ({CTL})")
    yield found
    # never leave the server stopped, whatever the test did
    if not _accepts(ADMIN):
        subprocess.run([CTL, "--skip-systemctl-redirect", *found, "start"], check=False)
    _wait_up(ADMIN)


def test_workers_ride_out_a_postgresql_restart_and_finish_everything_once(
    tmp_path: Path, cluster: tuple[str, str]
) -> None:
    db = fresh()
    n = 60
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="600", rps=100_000.0, seed=7, api_key=KEY)
    common = ("--concurrency", "4", "--lease", "20", "--unreachable-timeout", "60", "--json")
    with EmulatorThread(cfg) as emu:
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        workers = [start(m, out, emu.base_url, db, *common) for _ in range(2)]
        deadline = time.monotonic() + 30
        while not query(db, "SELECT 1 FROM jobs WHERE state = 'done' LIMIT 1 OFFSET 4"):
            assert time.monotonic() < deadline, "the workers never got going"
            time.sleep(0.05)
        t0 = time.monotonic()
        for action in ("stop", "start"):
            done = subprocess.run(
                [CTL, "--skip-systemctl-redirect", *cluster, action],
                capture_output=True,
                text=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            if action == "stop":
                time.sleep(DOWN)
        _wait_up(ADMIN)
        restarted = time.monotonic() - t0
        results = [w.communicate(timeout=60) for w in workers]
        stats = emu.stats()
    for w, (stdout, err) in zip(workers, results, strict=True):
        assert w.returncode == 0, err
        assert "Traceback" not in err, err
        # each worker paused once, for the one restart
        assert json.loads(stdout)["this_run"]["database_outages"] == 1, stdout
    check_done(db, out, n)
    # nothing generated twice, nothing billed and left unrecorded
    assert stats["images_billed"] == n and stats["duplicate_billed"] == 0, stats
    assert query(db, "SELECT sum(billed) AS n FROM jobs")[0]["n"] == n
    log = (out / "batcher.log").read_text(encoding="utf-8")
    # said once per outage, then back (both workers log to the run folder's file)
    assert log.count("the job database is unreachable") == 2, log
    backs = [line for line in log.splitlines() if "the job database is back after" in line]
    assert len(backs) == 2, log
    print(
        f"stop, {DOWN:g}s, start took {restarted:.1f}s; "
        + "; ".join(b.split(": ", 1)[1] for b in backs)
    )
