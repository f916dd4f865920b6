"""Benchmark 5, resume: from ``batcher run`` to its first API call on a big, nearly done folder.

The folder: the 1,000,000-row CSV planned with ``batcher plan`` (copied from
``bench/_work/cache`` when ``bench.import_scale`` or an earlier run already planned it with the
same sources), then 990,000 jobs marked done with one UPDATE through sqlite3. The command is the
one a user types to resume: ``batcher run MANIFEST --out DIR --base-url URL`` (so it re-reads
the manifest, as resuming does).

The first call's arrival is seen at the emulator (zero latency, no quota, pinned to its own
core): this process polls ``GET /_emulator/stats`` every 5 ms over one kept-alive connection
and notes when ``generate_requests`` first moves; then it interrupts the run (SIGINT) and waits
for it to exit. The baseline is the same command on a fresh 1,000-job manifest: the fixed cost
of starting a run (interpreter, imports, opening the database).

Goal: under 2 seconds on the big folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import engine_trace, profiling
from .common import (
    PYTHON,
    BenchError,
    Child,
    EmulatorProcess,
    Measured,
    batcher_command,
    batcher_run,
    pin_self,
    shown,
    split_cores,
    work_dir,
)
from .manifests import cached_manifest, mark_done, planned_folder
from .report import Goal, Result, bench_main, table, want_profile

SMALL = 1_000
POLL = 0.005


class StatsPoller:
    """``GET /_emulator/stats`` over one kept-alive connection."""

    def __init__(self, root_url: str) -> None:
        host, port = root_url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=5)

    def requests(self) -> int:
        self.connection.request("GET", "/_emulator/stats")
        reply = self.connection.getresponse()
        value: int = json.loads(reply.read())["generate_requests"]
        return value

    def close(self) -> None:
        self.connection.close()


def time_to_first_call(
    command: list[str], emu: EmulatorProcess, work: Path, label: str, timeout: float
) -> tuple[float, Measured]:
    """Seconds from starting ``command`` to the emulator's first generation request."""
    poller = StatsPoller(emu.root_url)
    before = poller.requests()
    child = Child(command, cwd=work, stdout=work / f"{label}.out", stderr=work / f"{label}.err")
    first: float | None = None
    try:
        deadline = child.started + timeout
        while time.perf_counter() < deadline:
            if poller.requests() > before:
                first = time.perf_counter() - child.started
                break
            if child.poll() is not None:
                break
            time.sleep(POLL)
        child.interrupt()
        measured = child.wait(60)
    finally:
        child.kill()
        poller.close()
    if first is None:
        raise BenchError(
            f"{shown(command)} made no API call within {timeout:.0f} s "
            f"(exit {measured.returncode}): {measured.stderr[-800:]}"
        )
    return first, measured


def run_command(manifest: Path, out: Path, base_url: str) -> list[str]:
    return batcher_run(manifest, out, base_url, json_out=False)


def measure(quick: bool, args: argparse.Namespace) -> Result:
    n = 200_000 if quick else 1_000_000
    work = work_dir("resume")
    folder = work / "run"
    build_started = time.perf_counter()
    cached = planned_folder(n, folder, timeout=60 + n / 1000)
    left = mark_done(folder / "batcher.db")
    build_seconds = time.perf_counter() - build_started
    manifest = cached_manifest(n)
    small_manifest = cached_manifest(SMALL)
    client_cores, server_core = split_cores()
    rows: list[list[Any]] = []
    with EmulatorProcess(latency="0", rps="inf", core=server_core) as emu:
        pin_self(client_cores)
        small_cmd = run_command(small_manifest, work / "small", emu.base_url)
        small_first, small_run = time_to_first_call(small_cmd, emu, work, "small", 60)
        big_cmd = run_command(manifest, folder, emu.base_url)
        big_first, big_run = time_to_first_call(big_cmd, emu, work, "big", 60 + n / 2000)
    rows = [
        [f"fresh run folder, {SMALL:,} jobs (baseline)", small_first, "1.00x", small_run.wall],
        [
            f"{n:,} jobs, {n - left:,} done, {left:,} pending",
            big_first,
            f"{big_first / small_first:.2f}x",
            big_run.wall,
        ],
    ]
    goals = [
        Goal(
            text="resume: first API call < 2 s",
            met=big_first < 2.0,
            measured=f"{big_first:.2f} s ({big_first / small_first:.1f}x a fresh small run's "
            f"{small_first:.2f} s)",
        )
    ]
    result = Result(
        name="resume",
        title="5. Resume",
        quick=quick,
        sizes=f"N = {n:,} jobs, {n - left:,} done",
        table=table(
            ["run folder", "s to first API call", "vs baseline", "s to exit after SIGINT"], rows
        ),
        goals=goals,
        commands=[shown(big_cmd)],
        figures={"first_call_s": big_first, "baseline_s": small_first},
        notes=[
            f"Building the folder took {build_seconds:.0f} s "
            f"({'a cached plan copied' if cached else 'batcher plan'} + one UPDATE).",
            "The time to exit includes the SIGINT grace (calls in flight finish) and whatever "
            "the run does on its way out.",
        ],
    )
    if want_profile(args, goals[0].met):
        try:
            _profile(result, manifest, folder, work)
        except BenchError as exc:
            result.notes.append(f"No py-spy profile: {exc}")
    return result


def _profile(result: Result, manifest: Path, folder: Path, work: Path) -> None:
    """Where the time to the first call goes: a wall-clock profile of the run on a copy of the
    big folder, the run killed (SIGKILL) as soon as the emulator sees its first call, so the
    profile covers exactly the time to the first call (and the few ms of polling after it)."""
    copy = work / "profiled"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(folder, copy)
    client_cores, server_core = split_cores()
    out = work / "profile-resume.txt"
    with EmulatorProcess(latency="0", rps="inf", core=server_core) as emu:
        pin_self(client_cores)
        command = run_command(manifest, copy, emu.base_url)
        poller = StatsPoller(emu.root_url)
        spy = profiling.start(command, out=out, cwd=work, mode="wall")
        try:
            pid = profiling.profiled_pid(spy)
            deadline = time.monotonic() + 120
            while poller.requests() == 0 and spy.poll() is None:
                if time.monotonic() > deadline:
                    raise BenchError("the profiled run made no API call in 120 s")
                time.sleep(POLL)
            os.kill(pid, signal.SIGKILL)
            profiling.finish(spy, out, command, 60)
        finally:
            poller.close()
            if spy.poll() is None:
                os.killpg(spy.pid, signal.SIGKILL)
                spy.wait(timeout=10)
    for thread, what in (("main", "main thread"), ("other", "helper threads (SQLite)")):
        prof = profiling.summarise(
            out, command=shown(command), rate=200, mode="wall", thread=thread
        )
        result.profiles.append(
            prof.markdown(f"batcher run on the big folder until its first API call, {what}", top=20)
        )
    result.notes.append(
        "The profile's run was killed at its first API call; what a run does on its way out is "
        "not in it (see the time to exit in the table)."
    )
    # Which statements the main thread waited for: the same resume, SQL timed (SIGINT at the
    # first call, so the child can write its timeline).
    shutil.rmtree(copy)
    shutil.copytree(folder, copy)
    trace = work / "sql-trace.json"
    with EmulatorProcess(latency="0", rps="inf", core=server_core) as emu:
        command = [PYTHON, "-m", "bench.engine_trace", "--child", str(trace), "run"]
        command += run_command(manifest, copy, emu.base_url)[len(batcher_command("run")) :]
        time_to_first_call(command, emu, work, "sql-trace", 120)
    shutil.rmtree(copy)  # a copy of the million-row database, no longer needed
    _first, lines = engine_trace.slowest_before_first_call(trace)
    result.profiles.append("\n".join(["**Profile: SQL before the first call**", "", *lines]))


def main() -> int:
    return bench_main("resume", __doc__, measure)


if __name__ == "__main__":
    sys.exit(main())
