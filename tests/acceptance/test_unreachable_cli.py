"""An unreachable service is one condition of the run, not a failure per job: the real CLI against
a closed loopback port, and against a service that comes up while the run waits for it."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import REPO, batcher_cmd, check_invariants, run_args, run_cli

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = pytest.mark.serial

KEY = "sk-unreachable-5d2c8b1e9f"


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def manifest(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "m.csv"
    rows = ["id,prompt,size,seed"] + [f"u{i:02d},a lamp number {i},512*512,{i}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def job_rows(db: Path) -> list[tuple[str, int, int]]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT state, attempts, billed FROM jobs").fetchall()
    finally:
        con.close()


def test_a_closed_port_stops_the_run_with_exit_3_and_charges_no_attempt(tmp_path):
    out = tmp_path / "out"
    base = f"http://127.0.0.1:{closed_port()}/api/v1"
    began = time.monotonic()
    r = run_cli(
        *run_args(manifest(tmp_path, 20), out, base, "--unreachable-timeout", "2", "--json"),
        env={"DASHSCOPE_API_KEY": KEY},
    )
    took = time.monotonic() - began
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    stops = [line for line in r.stderr.splitlines() if "could not reach the service" in line]
    assert len(stops) == 1, r.stderr
    assert stops[0].startswith("batcher: ") and "127.0.0.1" in stops[0]
    assert "achieved" not in r.stderr  # no call was answered: no rate to speak of
    rows = job_rows(out / "batcher.db")
    assert len(rows) == 20
    assert {state for state, _, _ in rows} == {"pending"}
    assert all(attempts == 0 for _, attempts, _ in rows)
    summary = json.loads(r.stdout)
    assert summary["reason"] == "unreachable" and summary["exit_code"] == 3
    assert summary["this_run"]["calls_per_second"] is None
    assert took < 30
    assert KEY not in r.stderr + r.stdout


def test_a_service_that_comes_up_while_the_run_waits_is_used(tmp_path):
    """The run pauses, probes with backoff, and goes on once the port answers: every job done,
    none charged an attempt for the outage."""
    port = closed_port()
    out = tmp_path / "out"
    cmd = batcher_cmd(
        *run_args(
            manifest(tmp_path, 6),
            out,
            f"http://127.0.0.1:{port}/api/v1",
            "--unreachable-timeout",
            "60",
        )
    )
    emulator: list[EmulatorThread] = []
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**_env(), "DASHSCOPE_API_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )

    def come_up() -> None:
        time.sleep(1.5)
        cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=1, api_key=KEY, port=port)
        emu = EmulatorThread(cfg)
        emu.start()
        emulator.append(emu)

    starter = threading.Thread(target=come_up)
    starter.start()
    try:
        _stdout, stderr = proc.communicate(timeout=90)
    finally:
        starter.join()
        for emu in emulator:
            emu.stop()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert check_invariants(out) == {"done": 6}
    assert all(attempts == 1 for _, attempts, _ in job_rows(out / "batcher.db"))


def test_a_run_against_a_closed_port_with_the_default_window_does_not_fail_jobs(tmp_path):
    """Interrupted while it waits (the default window is minutes): nothing failed, no attempt
    charged, exit 130."""
    out = tmp_path / "out"
    base = f"http://127.0.0.1:{closed_port()}/api/v1"
    proc = subprocess.Popen(
        batcher_cmd(*run_args(manifest(tmp_path, 5), out, base)),
        cwd=REPO,
        env={**_env(), "DASHSCOPE_API_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    time.sleep(4)
    proc.send_signal(2)
    _stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    rows = job_rows(out / "batcher.db")
    assert {state for state, _, _ in rows} == {"pending"}
    assert all(attempts == 0 for _, attempts, _ in rows)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
