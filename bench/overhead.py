"""Benchmark 2, engine overhead: client CPU per 1,000 jobs and jobs/s, batcher vs the SDK baseline.

The emulator (zero latency, no quota: ``--rps inf``) runs in a subprocess pinned to its own core;
each client runs as a subprocess pinned to the other core, on the same CSV manifest of 512*512
images: ``batcher run MANIFEST --base-url URL --rps 1000`` (a user with a high quota says so)
and ``python -m bench.baseline_sdk MANIFEST --base-url URL --workers 16``. Each client's CPU
seconds (user + system) and peak RSS come from ``wait4`` on that client alone: the emulator's
CPU is never counted. The client's work includes generation calls, downloads and writing the
files; batcher also imports the manifest into SQLite, verifies every PNG, hashes it, fsyncs it
and records every step durably, the baseline does none of that.

jobs/s is counted from the first job to the last (batcher's ``elapsed_seconds``, the baseline's
pool time); the whole process's wall time, interpreter start included, is shown beside it. The
full run does two interleaved rounds (batcher, baseline, batcher, baseline) and keeps each
client's least-CPU round and best rate (the machine is shared: a busy spell only ever slows a
round down); ``--quick`` does one round of 2,000 jobs.

On a miss it adds a py-spy profile of a batcher run (the thread holding the GIL) and
:mod:`bench.engine_trace`'s counts of what batcher does per job.

Goal: batcher uses less CPU per job than the baseline; batcher sustains >= 500 jobs/s.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import engine_trace, profiling
from .common import (
    PYTHON,
    ROOT,
    BenchError,
    EmulatorProcess,
    Measured,
    batcher_run,
    pin_self,
    run_measured,
    shown,
    split_cores,
    work_dir,
)
from .manifests import cached_manifest
from .report import Goal, Result, bench_main, table, want_profile

BATCHER_RPS = "1000"
BASELINE_WORKERS = 16
TIMEOUT = 300.0


def _client_row(name: str, m: Measured, n: int, span: float, emu_cpu: float) -> dict[str, Any]:
    return {
        "client": name,
        "wall_s": m.wall,
        "span_s": span,
        "cpu_s": m.cpu,
        "user_s": m.user,
        "sys_s": m.system,
        "cpu_per_1000": m.cpu / n * 1000,
        "jobs_per_s": n / span,
        "jobs_per_s_wall": n / m.wall,
        "peak_rss_mb": m.maxrss_mb,
        "emulator_cpu_share": emu_cpu / m.wall,
    }


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The least disturbed of several rounds: the one that used the least CPU."""
    best = dict(min(rows, key=lambda r: r["cpu_s"]))
    best["jobs_per_s"] = max(r["jobs_per_s"] for r in rows)
    best["jobs_per_s_wall"] = max(r["jobs_per_s_wall"] for r in rows)
    best["rounds"] = [{k: r[k] for k in ("cpu_per_1000", "jobs_per_s", "wall_s")} for r in rows]
    return best


def _series(row: dict[str, Any], key: str, digits: int) -> str:
    return ", ".join(f"{r[key]:.{digits}f}" for r in row["rounds"])


def measure(quick: bool, args: argparse.Namespace) -> Result:
    n = 2000 if quick else 5000
    rounds = 1 if quick else 2
    work = work_dir("overhead")
    manifest = cached_manifest(n)
    client_cores, server_core = split_cores()
    b_rows: list[dict[str, Any]] = []
    s_rows: list[dict[str, Any]] = []
    with EmulatorProcess(latency="0", rps="inf", core=server_core) as emu:
        pin_self(client_cores)

        def b_command(out: str) -> list[str]:
            return batcher_run(manifest, work / out, emu.base_url, rps=BATCHER_RPS)

        def s_command(out: str) -> list[str]:
            return [
                PYTHON,
                "-m",
                "bench.baseline_sdk",
                str(manifest),
                "--out",
                str(work / out),
                "--base-url",
                emu.base_url,
                "--workers",
                str(BASELINE_WORKERS),
                "--json",
            ]

        for r in range(rounds):  # interleaved, so a busy spell of the machine hits both
            for kind, build, rows in (("batcher", b_command, b_rows), ("sdk", s_command, s_rows)):
                command = build(f"{kind}-{r}")
                cpu0 = emu.cpu_seconds()
                m = run_measured(command, cwd=ROOT, timeout=TIMEOUT, logs=work / f"{kind}-{r}")
                data = m.check().json()
                if data["done"] != n:
                    raise BenchError(f"{shown(command)} finished {data['done']} of {n}")
                emu_cpu = emu.cpu_seconds() - cpu0
                rows.append(_client_row(kind, m, n, float(data["elapsed_seconds"]), emu_cpu))
        b_row, s_row = _best(b_rows), _best(s_rows)
        b_row["client"] = "batcher"
        s_row["client"] = f"baseline (SDK, {BASELINE_WORKERS} threads)"
        commands = [shown(b_command("batcher-0")), shown(s_command("sdk-0"))]

        cpu_ratio = b_row["cpu_per_1000"] / s_row["cpu_per_1000"]
        rate_ratio = b_row["jobs_per_s"] / s_row["jobs_per_s"]
        headers = [
            "client",
            "CPU s / 1000 jobs",
            "jobs/s",
            "jobs/s (whole process)",
            "CPU s (user + sys)",
            "wall s",
            "peak RSS MB",
            "emulator core busy",
        ]
        table_rows: list[list[Any]] = [
            [
                r["client"],
                r["cpu_per_1000"],
                r["jobs_per_s"],
                r["jobs_per_s_wall"],
                f"{r['cpu_s']:.2f} ({r['user_s']:.2f} + {r['sys_s']:.2f})",
                r["wall_s"],
                r["peak_rss_mb"],
                f"{r['emulator_cpu_share']:.0%}",
            ]
            for r in (b_row, s_row)
        ]
        table_rows.append(
            [
                "ratio batcher / baseline",
                f"{cpu_ratio:.2f}x",
                f"{rate_ratio:.2f}x",
                f"{b_row['jobs_per_s_wall'] / s_row['jobs_per_s_wall']:.2f}x",
                "",
                "",
                "",
                "",
            ]
        )
        goals = [
            Goal(
                text="batcher CPU per job < the baseline's",
                met=cpu_ratio < 1.0,
                measured=f"{b_row['cpu_per_1000']:.2f} vs {s_row['cpu_per_1000']:.2f} CPU s per "
                f"1,000 jobs = {cpu_ratio:.2f}x",
            ),
            Goal(
                text="batcher >= 500 jobs/s",
                met=b_row["jobs_per_s"] >= 500,
                measured=f"{b_row['jobs_per_s']:.0f} jobs/s ({b_row['jobs_per_s_wall']:.0f} over "
                "the whole process)",
            ),
        ]
        each = "; ".join(
            f"{name} {_series(row, 'cpu_per_1000', 2)} CPU s/1000, "
            f"{_series(row, 'jobs_per_s', 0)} jobs/s"
            for name, row in (("batcher", b_row), ("baseline", s_row))
        )
        result = Result(
            name="overhead",
            title="2. Engine overhead",
            quick=quick,
            sizes=f"N = {n:,} jobs of 512*512, emulator latency 0, no quota, "
            f"best of {rounds} interleaved round{'s' if rounds > 1 else ''}",
            table=table(headers, table_rows),
            goals=goals,
            commands=commands,
            figures={"batcher": b_row, "baseline": s_row, "cpu_ratio": cpu_ratio},
            notes=[
                f"Each round: {each}. The table shows each client's least-CPU round and its "
                "best rate: CPU per job is steady from round to round, jobs/s is not (the "
                "machine is shared).",
                f"batcher is told --rps {BATCHER_RPS}; the baseline has no rate limiter and "
                f"{BASELINE_WORKERS} threads (8, 16, 32 and 64 were tried while writing this: CPU "
                "per job within 10% of each other for 8 to 32, more at 64; 16 and 32 fastest).",
                "'emulator core busy' is the emulator's CPU over the client's wall time: near "
                "100% would mean the emulator, not the client, set the pace.",
            ],
        )
        if want_profile(args, all(g.met for g in goals)):
            try:
                prof = profiling.profile(
                    b_command("batcher-profiled"),
                    out=work / "profile-gil.txt",
                    cwd=work,
                    timeout=TIMEOUT,
                    mode="gil",
                )
                result.profiles.append(
                    prof.markdown("batcher run, engine overhead (who holds the GIL)", top=24)
                )
            except BenchError as exc:
                result.notes.append(f"No py-spy profile: {exc}")
    if want_profile(args, all(g.met for g in goals)):
        jobs = 2000
        per_job, _summary = engine_trace.trace_run(jobs)
        result.figures["per_job"] = per_job
        result.profiles.append(
            "\n".join(
                [
                    f"**Profile: what batcher does per job** (`python -m bench.engine_trace "
                    f"--jobs {jobs}`)",
                    "",
                    *engine_trace.describe(per_job, jobs),
                    "",
                    *engine_trace.syscalls_per_job(jobs),
                ]
            )
        )
    return result


def main() -> int:
    return bench_main("overhead", __doc__, measure)


if __name__ == "__main__":
    sys.exit(main())
