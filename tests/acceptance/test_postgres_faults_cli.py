"""Faults of a PostgreSQL run several workers share, with the real CLI against the emulator:
a worker cut off from the database (a real TCP forwarder between it and the server) for longer
than its lease, one that gives up on it, and one of three workers killed with SIGKILL."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.acceptance.test_postgres_cli import KEY, check_done, manifest, start
from tests.pgsupport import fresh, query
from tests.support import run_cli
from tests.tcpproxy import TcpProxy

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = pytest.mark.serial


@pytest.fixture
def db() -> str:
    return fresh()


@pytest.fixture
def proxy(db: str) -> Iterator[TcpProxy]:
    with TcpProxy.to(db) as p:
        yield p


def worker_of(proc: subprocess.Popen[str]) -> str:
    """What the job table's ``worker`` column says for jobs ``proc`` holds."""
    return f"{socket.gethostname()}:{proc.pid}"


def states(db: str, worker: str | None = None) -> dict[str, int]:
    sql = "SELECT state, count(*) AS n FROM jobs"
    rows = query(db, sql + " WHERE worker = $1 GROUP BY state", worker) if worker else None
    rows = rows if rows is not None else query(db, sql + " GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


def wait_for(what: str, ok: Callable[[], bool], *, within: float = 30.0) -> float:
    """Poll ``ok`` until it holds; the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if ok():
            return time.monotonic() - t0
        time.sleep(0.05)
    pytest.fail(f"never happened within {within:g}s: {what}")


def test_a_worker_cut_off_past_its_lease_loses_its_jobs_and_its_late_writes_are_refused(
    tmp_path: Path, db: str, proxy: TcpProxy
) -> None:
    n = 40
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="1000", rps=100_000.0, seed=4, api_key=KEY)
    common = ("--concurrency", "4", "--lease", "2", "--json")
    with EmulatorThread(cfg) as emu:
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        a = start(m, out, emu.base_url, proxy.url(db), *common, "--unreachable-timeout", "60")
        me = worker_of(a)
        wait_for(
            "A has finished jobs and calls in flight", lambda: states(db, me).get("done", 0) >= 2
        )
        proxy.cut()
        cut_at = time.monotonic()
        held = {
            r["id"]
            for r in query(db, "SELECT id FROM jobs WHERE worker = $1 AND state <> 'done'", me)
        }
        assert held, "A held no job when it was cut off"
        b = start(m, out, emu.base_url, db, *common)
        # A's lease runs out and B takes every job A held over (A, cut off, cannot renew)
        took = wait_for(
            "B took over every job A held",
            lambda: (
                not query(
                    db,
                    "SELECT id FROM jobs WHERE worker = $1 AND id = ANY($2::text[])",
                    me,
                    list(held),
                )
            ),
        )
        # A counts its outage from its first failed call, up to a heartbeat after the cut (and
        # its leases ran out up to a heartbeat before it): keep it cut for twice the lease, so
        # that the outage it measures is surely longer than its lease, as its log says below.
        time.sleep(max(0.0, cut_at + 2 * 2.0 - time.monotonic()))
        proxy.restore()
        (a_out, a_err), (_, b_err) = (p.communicate(timeout=60) for p in (a, b))
        stats = emu.stats()
    assert a.returncode == 0, a_err
    assert b.returncode == 0, b_err
    assert "Traceback" not in a_err + b_err
    a_run = json.loads(a_out)["this_run"]
    # every job A held was B's when A came back: A's answers in hand were refused by the fence
    assert a_run["lease_lost"] >= 1, a_run
    assert a_run["database_outages"] == 1, a_run
    check_done(db, out, n)  # no temporary file left: A's refused image was never put in place
    assert query(db, "SELECT sum(billed) AS n FROM jobs")[0]["n"] == n
    # generated twice: at most A's calls in flight when it was cut off (--concurrency 4)
    assert stats["duplicate_billed"] <= 4, stats
    assert stats["images_billed"] - stats["duplicate_billed"] == n
    log = (out / "batcher.log").read_text(encoding="utf-8")
    assert log.count("the job database is unreachable") == 1, log
    assert "back after" in log and "longer than the lease, 2s" in log, log
    print(
        f"B took A's {len(held)} jobs over {took:.1f}s after the cut; A lost {a_run['lease_lost']}"
    )


def test_a_worker_gives_up_on_a_silent_database_after_the_window_and_nothing_is_lost(
    tmp_path: Path, db: str, proxy: TcpProxy
) -> None:
    """The network drops every packet without a word (the proxy frozen): statements time out
    (``?command_timeout=1``), the worker pauses, and past --unreachable-timeout it stops."""
    n = 20
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="300", rps=100_000.0, seed=5, api_key=KEY)
    common = ("--concurrency", "4", "--lease", "2")
    with EmulatorThread(cfg) as emu:
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        silent = proxy.url(db) + "?command_timeout=1"
        a = start(m, out, emu.base_url, silent, *common, "--unreachable-timeout", "2")
        wait_for("A has finished jobs", lambda: states(db).get("done", 0) >= 2)
        proxy.freeze()
        t0 = time.monotonic()
        sent = emu.stats()["generate_requests"]
        _, err = a.communicate(timeout=30)
        gave_up = time.monotonic() - t0
        # paused: no call went out after the freeze but those already on their way (4 at most)
        assert emu.stats()["generate_requests"] - sent <= 4
        assert a.returncode == 3, err
        lines = err.strip().splitlines()
        assert "Traceback" not in err and lines[-1].startswith("batcher: error: "), err
        assert "the job database could not be reached for" in lines[-1], err
        assert "no answer in time" in lines[-1], err
        assert sum(states(db).values()) == n  # every job is still there, as it was left
        # the same command, once the database is back (here: straight to it), finishes
        t1 = time.monotonic()
        again = start(m, out, emu.base_url, db, *common)
        _, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
        took = time.monotonic() - t1
        print(f"gave up {gave_up:.1f}s after the freeze; the next run took {took:.1f}s")
        stats = emu.stats()
    check_done(db, out, n, after_kill=True)  # a .part of the worker that gave up may stay
    assert query(db, "SELECT sum(billed) AS n FROM jobs")[0]["n"] == n
    assert stats["duplicate_billed"] <= 4, stats  # the answers it held when it gave up
    assert 2.0 <= gave_up < 10.0, gave_up


def test_one_of_three_workers_killed_the_other_two_finish_and_nothing_is_made_twice(
    tmp_path: Path, db: str
) -> None:
    n = 60
    m = manifest(tmp_path, n)
    out = tmp_path / "out"
    cfg = EmulatorConfig(latency="400", rps=100_000.0, seed=6, api_key=KEY)
    common = ("--concurrency", "4", "--lease", "2")
    with EmulatorThread(cfg) as emu:
        assert run_cli("plan", m, "--out", out, "--db", db).returncode == 0
        workers = [start(m, out, emu.base_url, db, *common) for _ in range(3)]
        doomed = workers[0]
        me = worker_of(doomed)
        wait_for(
            "the first worker has finished jobs and holds some",
            lambda: states(db, me).get("done", 0) >= 2 and states(db, me).get("running", 0) >= 1,
        )
        doomed.send_signal(signal.SIGKILL)
        doomed.communicate(timeout=30)
        held = query(db, "SELECT id FROM jobs WHERE worker = $1 AND state <> 'done'", me)
        assert held, "the killed worker held no job"
        for w in workers[1:]:
            _, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
        stats = emu.stats()
    check_done(db, out, n, after_kill=True)
    assert query(db, "SELECT sum(billed) AS n FROM jobs")[0]["n"] == n
    # the jobs the dead worker held were taken over and finished by the other two
    survivors = {worker_of(w) for w in workers[1:]}
    ids = [r["id"] for r in held]
    finishers = {r["worker"] for r in query(db, "SELECT worker FROM jobs WHERE id = ANY($1)", ids)}
    assert finishers <= survivors, finishers
    # generated twice: at most the dead worker's calls in flight (--concurrency 4)
    assert stats["duplicate_billed"] <= 4, stats
    assert stats["images_billed"] - stats["duplicate_billed"] == n
