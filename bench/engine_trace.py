"""Counting what batcher does per job: SQL statements, transactions, thread hops, fsyncs.

The CPU profile of benchmark 2 says *where* the time goes; this says *how often*. It runs the
real ``batcher run`` CLI in-process (its ``main``) against a pinned emulator (zero latency, no
quota) and counts, per job:

* SQL statements by kind, as SQLAlchemy sends them (``before_cursor_execute``), and the
  transactions SQLAlchemy begins (statements a store sends on the raw sqlite3 connection, such
  as a batch of fenced updates run as one function, are not seen there: see the round trips by
  function, and the system calls);
* aiosqlite round trips (``Connection._execute``), by the function sent: each one hands a call
  to the database thread and wakes the event loop when it is done;
* anyio worker-thread calls (``to_thread.run_sync``: file creation, fsync, rename);
* ``os.fsync`` calls made by batcher itself (image files and folders);
* ``JobStore.claim`` calls, and the jobs each one returned on average.

It also keeps every SQL statement's duration and the moment of the first API call (in
``counts.sql.json``), which :mod:`bench.resume` uses to name the statements a resume waits for.

Run: ``python -m bench.engine_trace [--jobs 2000]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def _child(argv: list[str], out: Path) -> int:
    import os

    import aiosqlite.core
    import anyio.to_thread
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from batcher import cli
    from jobs.store import JobStore

    counts: Counter[str] = Counter()

    original_claim = JobStore.claim

    async def claim(self: Any, **kwargs: Any) -> Any:
        got = await original_claim(self, **kwargs)
        counts["JobStore.claim calls"] += 1
        counts["jobs claimed"] += len(got)
        return got

    JobStore.claim = claim  # type: ignore[method-assign]

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        word = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
        counts[f"sql {word}"] += 1

    def on_begin(_conn: Any) -> None:
        counts["SQLAlchemy transactions"] += 1

    import time

    from batcher.client import DashScopeClient

    t0 = time.perf_counter()
    first_call: list[float] = []
    statements: list[tuple[float, float, str]] = []  # (start, seconds, statement)
    pending: dict[int, tuple[float, str]] = {}

    def before(_conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        pending[id(cursor)] = (time.perf_counter(), statement)

    def after(_conn: Any, cursor: Any, *_: Any) -> None:
        started, statement = pending.pop(id(cursor), (None, ""))
        if started is not None:
            statements.append((started - t0, time.perf_counter() - started, statement))

    event.listen(Engine, "before_cursor_execute", on_execute)
    event.listen(Engine, "before_cursor_execute", before)
    event.listen(Engine, "after_cursor_execute", after)
    event.listen(Engine, "begin", on_begin)  # SQLAlchemy's transactions only

    original_generate = DashScopeClient.generate

    async def generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not first_call:
            first_call.append(time.perf_counter() - t0)
        return await original_generate(self, *args, **kwargs)

    DashScopeClient.generate = generate  # type: ignore[method-assign]

    original_execute = aiosqlite.core.Connection._execute

    async def execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        counts["aiosqlite round trips"] += 1
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        counts[f"  of which {name}"] += 1
        return await original_execute(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    aiosqlite.core.Connection._execute = execute  # type: ignore[method-assign]

    original_run_sync = anyio.to_thread.run_sync

    async def run_sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
        counts["anyio to_thread calls"] += 1
        return await original_run_sync(fn, *args, **kwargs)

    anyio.to_thread.run_sync = run_sync  # type: ignore[assignment]

    original_fsync = os.fsync

    def fsync(fd: int) -> None:
        counts["os.fsync (files, folders)"] += 1
        original_fsync(fd)

    os.fsync = fsync  # type: ignore[assignment]
    try:
        return cli.main(argv)
    finally:
        out.write_text(json.dumps(dict(counts)))
        timeline = {"first_call": first_call[0] if first_call else None, "sql": statements}
        out.with_suffix(".sql.json").write_text(json.dumps(timeline))


def trace_run(jobs: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Counts per job of a fresh ``jobs``-job run, and the run's JSON summary."""
    from .common import PYTHON, ROOT, EmulatorProcess, pin_self, run_measured, split_cores, work_dir
    from .manifests import cached_manifest

    work = work_dir("engine_trace")
    out = work / "counts.json"
    client_cores, server_core = split_cores()
    with EmulatorProcess(latency="0", rps="inf", core=server_core) as emu:
        pin_self(client_cores)
        command = [PYTHON, "-m", "bench.engine_trace", "--child", str(out), "run"]
        command += [str(cached_manifest(jobs)), "--out", str(work / "run")]
        command += ["--base-url", emu.base_url, "--rps", "1000", "--json", "--no-progress"]
        measured = run_measured(command, cwd=ROOT, timeout=600, logs=work / "run.log").check()
    counts = json.loads(out.read_text())
    per_job = {k: v / jobs for k, v in sorted(counts.items()) if k != "jobs claimed"}
    if counts.get("JobStore.claim calls"):
        per_job["(jobs per claim)"] = counts["jobs claimed"] / counts["JobStore.claim calls"]
    return per_job, measured.json()


def syscalls_per_job(jobs: int, top: int = 12) -> list[str]:
    """System calls per job of a fresh ``jobs``-job run under ``strace -f -c`` (exact counts;
    strace slows the run a lot, so only the counts mean anything, not the times)."""
    import shutil

    from .common import EmulatorProcess, batcher_command, pin_self, run_measured, split_cores
    from .manifests import cached_manifest

    strace = shutil.which("strace")
    if strace is None:
        return ["(strace is not installed: no system call counts)"]
    work = work_dir_for("engine_trace_strace")
    summary = work / "strace.txt"
    client_cores, server_core = split_cores()
    with EmulatorProcess(latency="0", rps="inf", core=server_core) as emu:
        pin_self(client_cores)
        command = [strace, "-f", "-c", "-o", str(summary)]
        command += batcher_command("run", str(cached_manifest(jobs)), "--out", str(work / "run"))
        command += ["--base-url", emu.base_url, "--rps", "1000", "--json", "--no-progress"]
        run_measured(command, cwd=work, timeout=600, logs=work / "run.log").check()
    counts: list[tuple[int, str]] = []
    for line in summary.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[3].isdigit():
            counts.append((int(parts[3]), parts[-1]))
    counts.sort(reverse=True)
    lines = [
        f"| system calls per job (`strace -f -c`, a {jobs:,}-job run) | count |",
        "|---|---|",
    ]
    lines += [f"| {name} | {n / jobs:.2f} |" for n, name in counts if name != "total"][:top]
    for name in ("fsync", "fdatasync"):
        if not any(n == name for _, n in counts[:top]):
            lines += [f"| {name} | {c / jobs:.2f} |" for c, n in counts if n == name]
    return lines


def work_dir_for(name: str) -> Path:
    from .common import work_dir

    return work_dir(name)


def slowest_before_first_call(out: Path, top: int = 5) -> tuple[float | None, list[str]]:
    """From a child's SQL timeline: the first call's time and the slowest statements before it."""
    data = json.loads(out.with_suffix(".sql.json").read_text())
    first = data["first_call"]
    before = [s for s in data["sql"] if first is None or s[0] < first]
    total = sum(s[1] for s in before)
    lines = [
        f"SQL before the first API call: {len(before)} statements, {total:.2f} s in all "
        f"(first call at {first:.2f} s after the CLI's main started):"
        if first is not None
        else f"SQL (no API call was made): {len(before)} statements, {total:.2f} s",
        "",
        "| s | at s | statement |",
        "|---|---|---|",
    ]
    for at, seconds, statement in sorted(before, key=lambda s: -s[1])[:top]:
        text = " ".join(statement.split())
        text = text if len(text) <= 160 else text[:157] + "..."
        lines.append(f"| {seconds:.3f} | {at:.2f} | `{text}` |")
    return first, lines


def describe(per_job: dict[str, float], jobs: int) -> list[str]:
    lines = [f"| per job (a {jobs:,}-job run, import included) | count |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in per_job.items()]
    return lines


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return _child(sys.argv[3:], Path(sys.argv[2]))
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_trace", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    per_job, _summary = trace_run(args.jobs)
    print("\n".join(describe(per_job, args.jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
