"""The real CLI in a subprocess, killed with SIGKILL at a chosen point, then
run again. Each test ends on the run-folder invariants (``check_invariants``).

1. during a large manifest import: the re-run imports exactly the manifest, no duplicates;
2. while generation calls are in flight: the jobs come back, one file each, and the only extra
   generations are the calls that were in flight;
3. between "generated" and the download: the re-run downloads without generating again;
4. in the middle of a slow download: no file at the final path, the temporary one is cleaned up,
   the download is redone without a new generation.

For 3 and 4 a relay of the test's own (:class:`tests.support.ImageRelay`) sits between the CLI
and the emulator: generation goes through to the emulator (which bills it), the image URLs in its
answers point at the relay, which stalls or trickles the downloads on demand.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import (
    REPO,
    ImageRelay,
    ServerThread,
    batcher_cmd,
    check_invariants,
    db_states,
    files_under,
    noise_png,
    run_args,
    run_cli,
)

# kills the run at chosen points, which a loaded machine can let it pass: run alone
# (see tests/conftest.py)
pytestmark = pytest.mark.serial

KEY = "sk-crash-points-5b0e"
ENV = {"DASHSCOPE_API_KEY": KEY}


def start(*args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    return subprocess.Popen(
        batcher_cmd(*args),
        env={**env, **ENV},
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(what: str, condition: Callable[[], bool], proc: subprocess.Popen[str], timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}:\n{err}")
        time.sleep(0.003)
    proc.kill()
    proc.communicate()
    raise AssertionError(f"timed out waiting for {what}")


def kill_9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def csv_manifest(path: Path, n: int, *, size: str = "512*512") -> Path:
    lines = ["id,prompt,size,seed"]
    lines += [f"job-{i:06d},a product photo of item {i},{size},{i}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def job_ids(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [row[0] for row in con.execute("SELECT id FROM jobs")]
    finally:
        con.close()


@pytest.fixture
def emulator():
    with EmulatorThread(EmulatorConfig(latency="0", rps=100_000.0, seed=8, api_key=KEY)) as emu:
        yield emu


# ---------------------------------------------------------------------------------------- 1


def test_kill_during_a_large_import_then_the_rerun_imports_exactly_the_manifest(tmp_path, emulator):
    out = tmp_path / "out"
    manifest = tmp_path / "m.csv"
    # an earlier import of the first rows, then the user adds many more to the same manifest
    csv_manifest(manifest, 1_000)
    assert run_cli("plan", manifest, "--out", out).returncode == 0
    csv_manifest(manifest, 12_000)
    wal = out / "batcher.db-wal"
    proc = start(*run_args(manifest, out, emulator.base_url))
    # the import transaction has begun spilling pages to the WAL: it is well under way
    wait_for(
        "the import to be under way", lambda: wal.exists() and wal.stat().st_size > 256_000, proc
    )
    kill_9(proc)
    assert emulator.stats()["generate_requests"] == 0  # killed before any call
    ids = job_ids(out / "batcher.db")
    assert len(ids) == 1_000, "the kill landed after the import committed; nothing was tested"
    assert sorted(ids) == [f"job-{i:06d}" for i in range(1_000)]
    check_invariants(out)

    again = run_cli("plan", manifest, "--out", out, "--json")
    assert again.returncode == 0, again.stderr
    plan = json.loads(again.stdout)
    assert (plan["new"], plan["unchanged"], plan["total"]) == (11_000, 1_000, 12_000)
    ids = job_ids(out / "batcher.db")
    assert len(ids) == len(set(ids)) == 12_000
    assert set(ids) == {f"job-{i:06d}" for i in range(12_000)}
    assert check_invariants(out) == {"pending": 12_000}


# ---------------------------------------------------------------------------------------- 2


def test_kill_while_calls_are_in_flight_then_each_job_comes_back_once(tmp_path):
    n, conc = 6, 3
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", n)
    cfg = EmulatorConfig(latency="600", rps=100_000.0, seed=9, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        proc = start(*run_args(manifest, out, emu.base_url, "--concurrency", str(conc)))
        wait_for("calls in flight", lambda: emu.stats()["generate_requests"] == conc, proc)
        kill_9(proc)
        killed_at = time.time()
        con = sqlite3.connect(out / "batcher.db")
        leased = con.execute(
            "SELECT count(*) FROM jobs WHERE state = 'running' AND lease_expires_at > ?",
            (killed_at,),
        ).fetchone()[0]
        con.close()
        states = db_states(out / "batcher.db")
        # the in-flight jobs (and any claimed to go next) are left running, under their lease
        assert leased == states["running"] >= conc
        assert states["running"] + states.get("pending", 0) == n
        assert (out / ".calls-in-flight").exists()  # the calls sent, for the next run

        emu.reconfigure(latency="0")
        r = run_cli(*run_args(manifest, out, emu.base_url), env=ENV)
        assert r.returncode == 0, r.stderr
        # the abandoned calls still finish (and bill) on the service's side
        deadline = time.monotonic() + 5
        while emu.stats()["images_billed"] < n + conc and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        s = emu.stats()
    # the extra generations are exactly the calls that were in flight at the kill
    assert s["images_billed"] == n + conc and s["duplicate_billed"] == conc
    # ... and the rerun counted each of them as perhaps billed (ambiguous), and no other
    # (a job claimed to go next but never sent is not)
    con = sqlite3.connect(out / "batcher.db")
    ambiguous = [a for (a,) in con.execute("SELECT ambiguous FROM jobs ORDER BY id")]
    con.close()
    assert sorted(ambiguous) == [0] * (n - conc) + [1] * conc
    assert f"({conc} with a call sent and its answer lost" in (out / "batcher.log").read_text()
    assert f"{conc} ambiguous re-sends (may have been billed)" in r.stderr  # this run's
    assert json.loads(run_cli("status", out, "--json").stdout)["ambiguous"] == conc
    assert not (out / ".calls-in-flight").exists()  # a clean end removes it
    assert check_invariants(out) == {"done": n}
    pngs = [p for p in files_under(out / "images") if p.endswith(".png")]
    assert len(pngs) == n  # one file per job


# ---------------------------------------------------------------------------------------- 3


def test_kill_between_generated_and_download_then_no_new_generation(tmp_path, emulator):
    n = 4
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", n)
    relay = ImageRelay(emulator.root_url)
    relay.mode = "stall"
    with ServerThread(relay.app()) as server:
        base = server.url + "/api/v1"
        proc = start(*run_args(manifest, out, base, "--concurrency", str(n)))
        wait_for("every download to hang", lambda: relay.stalled == n, proc)
        kill_9(proc)
        assert db_states(out / "batcher.db") == {"generated": n}
        assert emulator.stats()["images_billed"] == n
        assert not [p for p in files_under(out / "images") if p.endswith(".png")]

        relay.mode = "pass"
        r = run_cli(*run_args(manifest, out, base), env=ENV)
        assert r.returncode == 0, r.stderr
        s = emulator.stats()
    assert s["generate_requests"] == n and s["images_billed"] == n  # not generated again
    assert s["duplicate_billed"] == 0
    assert check_invariants(out) == {"done": n}


# ---------------------------------------------------------------------------------------- 4


def test_kill_during_a_slow_download_then_the_download_alone_is_redone(tmp_path, emulator):
    n = 1
    out = tmp_path / "out"
    manifest = csv_manifest(tmp_path / "m.csv", n, size="2048*2048")
    big = noise_png(2048, 2048, seed=4)  # 12.6 MB: streamed to a temporary file, not memory
    relay = ImageRelay(emulator.root_url)
    relay.body, relay.first, relay.mode = big, 6 << 20, "slow"
    images = out / "images"

    def partials() -> list[str]:
        return (
            sorted(p for p in files_under(images) if p.endswith(".part")) if images.is_dir() else []
        )

    with ServerThread(relay.app()) as server:
        base = server.url + "/api/v1"
        proc = start(*run_args(manifest, out, base, "--concurrency", str(n)))
        wait_for(
            "the download to be half-way, on disk",
            lambda: relay.stalled == n and len(partials()) == n,
            proc,
        )
        kill_9(proc)
        assert db_states(out / "batcher.db") == {"generated": n}
        assert not [p for p in files_under(images) if p.endswith(".png")]  # nothing final
        assert len(partials()) == n  # the temporary files the kill left behind

        relay.mode = "body"
        r = run_cli(*run_args(manifest, out, base), env=ENV)
        assert r.returncode == 0, r.stderr
        s = emulator.stats()
    assert s["generate_requests"] == n and s["images_billed"] == n  # not generated again
    assert partials() == []  # cleaned up
    assert check_invariants(out) == {"done": n}
    for name in files_under(images):
        if name.endswith(".png"):
            assert (images / name).read_bytes() == big
