"""Asynchronous tasks through the real CLI: kill -9 while tasks are submitted, then resume
(no task created again), and ``batcher cancel`` for tasks still PENDING."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from batcher.emulator import EmulatorConfig, EmulatorThread

from ..support import REPO, batcher_cmd, check_invariants, run_args, run_cli

KEY = "sk-tasks-cli"
ENV = {"DASHSCOPE_API_KEY": KEY}


def manifest(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "wan.jsonl"
    rows = [
        {"id": f"w{i}", "prompt": f"a lighthouse, study {i}", "model": "wan2.2-t2i-flash"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def submitted(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as con:
            query = "SELECT count(*) FROM jobs WHERE state = 'submitted'"
            return int(con.execute(query).fetchone()[0])
    except sqlite3.OperationalError:  # the run has not made its tables yet
        return 0


def start_run(args: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"} | ENV
    return subprocess.Popen(
        batcher_cmd(*args),
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def wait_for(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_kill_9_while_submitted_then_resume_creates_no_task_again(tmp_path: Path) -> None:
    config = EmulatorConfig(latency="0", rps=math.inf, seed=21, task_seconds="3", api_key=KEY)
    out = tmp_path / "run"
    with EmulatorThread(config) as emu:
        args = run_args(manifest(tmp_path, 2), out, emu.base_url)
        proc = start_run(args)
        try:
            wait_for(lambda: submitted(out / "batcher.db") == 2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert emu.stats()["tasks_created"] == 2
        done = run_cli(*args, env=ENV)
        assert done.returncode == 0, done.stderr
        stats = emu.stats()
        assert stats["tasks_created"] == 2  # reattached, none created again
        assert stats["images_billed_by_model"] == {"wan2.2-t2i-flash": 2}
        assert stats["duplicate_billed"] == 0
    counts = check_invariants(out)
    assert counts == {"done": 2}


def test_cancel_cancels_pending_tasks_and_ctrl_c_does_not(tmp_path: Path) -> None:
    config = EmulatorConfig(latency="0", rps=math.inf, seed=22, task_seconds="400", api_key=KEY)
    out = tmp_path / "run"
    with EmulatorThread(config) as emu:
        args = run_args(manifest(tmp_path, 2), out, emu.base_url)
        proc = start_run(args)
        try:
            wait_for(lambda: submitted(out / "batcher.db") == 2)
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the tasks go on
            assert proc.wait(timeout=30) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
        assert emu.stats()["tasks_cancelled"] == 0
        assert submitted(out / "batcher.db") == 2
        cancelled = run_cli("cancel", out, "--base-url", emu.base_url, env=ENV)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.startswith("2 tasks cancelled; 0 already running")
        assert emu.stats()["tasks_cancelled"] == 2
    with sqlite3.connect(out / "batcher.db") as con:
        rows = con.execute("SELECT state, error_code FROM jobs").fetchall()
    assert rows == [("failed", "TaskCanceled")] * 2
