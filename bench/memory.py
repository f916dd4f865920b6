"""Benchmark 4, memory is flat: peak RSS of a small run against a run ten times larger.

Both are complete ``batcher run MANIFEST --base-url URL --rps 1000`` runs of fresh 512*512
CSV manifests (import included) against the emulator at zero latency, no quota, pinned to its
own core; peak RSS is the client's own ``ru_maxrss`` from ``wait4`` (the emulator's memory is
never counted). The small run is the baseline. RSS is also sampled from /proc every 20 ms and
split by the run's phases (start-up and import until batcher.log says "run start", the run,
then writing metadata.jsonl and exiting), so a difference shows where it arises.

Sizes: 10,000 against 100,000 jobs by default. A 100,000-job run takes a few minutes on a
2-core machine at batcher's speed, more than ``run_all``'s ten-minute budget allows next to the
other benchmarks, so ``--quick`` compares 5,000 with 50,000 (the same tenfold step); ``--large``
sets the larger size by hand.

Goal: the two peaks within 15% of each other, both under 200 MB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import memory_trace
from .common import (
    BenchError,
    Child,
    EmulatorProcess,
    Measured,
    batcher_run,
    pin_self,
    shown,
    split_cores,
    work_dir,
)
from .manifests import cached_manifest
from .report import Goal, Result, bench_main, table, want_profile


@dataclass
class Sampled:
    """A run's peak RSS, when it came and the peak within each phase of the run."""

    measured: Measured
    summary: dict[str, Any]
    peak_at: float  # seconds from the start
    phases: dict[str, float]  # phase -> peak RSS MB in it


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


def _log_times(log: Path) -> tuple[float | None, float | None]:
    """Wall-clock times of batcher.log's "run start" (import done) and "metadata.jsonl" lines."""
    start = end = None
    for line in log.read_text(errors="replace").splitlines():
        stamp = line[:23]
        try:
            when = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if "run start:" in line and start is None:
            start = when
        elif "metadata.jsonl:" in line:
            end = when
    return start, end


def _run(n: int, base_url: str, label: str) -> Sampled:
    """A fresh run of ``n`` jobs, its RSS sampled every 20 ms from /proc."""
    work = work_dir(f"memory/{label}")
    command = batcher_run(cached_manifest(n), work / "run", base_url)
    started_wall = time.time()
    child = Child(command, cwd=work, stdout=work / "run.out", stderr=work / "run.err")
    samples: list[tuple[float, float]] = []
    deadline = child.started + 120 + n / 50
    while child.poll() is None:
        rss = _rss_mb(child.pid)
        if rss is not None:
            samples.append((time.time(), rss))
        if time.perf_counter() > deadline:
            child.kill()
            raise BenchError(f"{shown(command)} took too long")
        time.sleep(0.02)
    measured = child.wait(1).check()
    summary = measured.json()
    if summary["done"] != n:
        raise BenchError(f"{shown(command)} finished {summary['done']} of {n}")
    imported, finished = _log_times(work / "run" / "batcher.log")
    bounds = [
        ("start-up and import", started_wall, imported),
        ("the run", imported, finished),
        ("metadata.jsonl and exit", finished, None),
    ]
    phases: dict[str, float] = {}
    for name, lo, hi in bounds:
        inside = [r for t, r in samples if (lo is None or t >= lo) and (hi is None or t < hi)]
        if inside:
            phases[name] = max(inside)
    peak_t = max(samples, key=lambda s: s[1])[0] if samples else started_wall
    return Sampled(measured, summary, peak_t - started_wall, phases)


def measure(quick: bool, args: argparse.Namespace) -> Result:
    small = args.small or (5_000 if quick else 10_000)
    large = args.large or (50_000 if quick else 100_000)
    client_cores, server_core = split_cores()
    # The emulator keeps every issued image's parameters: let it hold both runs' images.
    extra = ["--max-images", str(small + large + 1000)]
    with EmulatorProcess(latency="0", rps="inf", core=server_core, extra=extra) as emu:
        pin_self(client_cores)
        s_run = _run(small, emu.base_url, "small")
        b_run = _run(large, emu.base_url, "large")
    s, b = s_run.measured, b_run.measured
    growth = b.maxrss_mb / s.maxrss_mb - 1
    phase_names = ["start-up and import", "the run", "metadata.jsonl and exit"]
    rows = []
    for label, run, jobs, ref in (
        (f"{small:,} jobs (baseline)", s_run, small, None),
        (f"{large:,} jobs", b_run, large, s.maxrss_mb),
    ):
        m = run.measured
        rows.append(
            [
                label,
                m.maxrss_mb,
                "1.00x" if ref is None else f"{m.maxrss_mb / ref:.2f}x",
                *[run.phases.get(p) for p in phase_names],
                f"{run.peak_at:.1f} of {m.wall:.1f}",
                jobs / float(run.summary["elapsed_seconds"]),
            ]
        )
    goals = [
        Goal(
            text="peak RSS of the larger run within 15% of the smaller's",
            met=abs(growth) <= 0.15,
            measured=f"{b.maxrss_mb:.0f} MB vs {s.maxrss_mb:.0f} MB = {growth:+.1%}",
        ),
        Goal(
            text="both under 200 MB",
            met=max(s.maxrss_mb, b.maxrss_mb) < 200,
            measured=f"largest {max(s.maxrss_mb, b.maxrss_mb):.0f} MB",
        ),
    ]
    notes = []
    if large < 100_000:
        notes.append(
            f"Sizes {small:,} and {large:,} rather than 10,000 and 100,000: a 100,000-job run "
            "does not fit run_all's ten-minute budget on this machine beside the other "
            "benchmarks (run `python -m bench.memory` for the full sizes)."
        )
    result = Result(
        name="memory",
        title="4. Memory is flat",
        quick=quick,
        sizes=f"{small:,} vs {large:,} jobs of 512*512, import included, latency 0",
        table=table(
            [
                "run",
                "peak RSS MB",
                "vs baseline",
                *[f"peak in {p}" for p in phase_names],
                "peak at s",
                "jobs/s",
            ],
            rows,
        ),
        goals=goals,
        notes=notes,
        commands=[shown(b.command)],
        figures={"small": [small, s.maxrss_mb], "large": [large, b.maxrss_mb]},
    )
    if want_profile(args, all(g.met for g in goals)):
        jobs = small
        points = memory_trace.trace_run(jobs)
        result.profiles.append(
            "\n".join(["**Profile: memory**", "", *memory_trace.describe(points, jobs)])
        )
    return result


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", type=int, help="jobs in the smaller run")
    parser.add_argument("--large", type=int, help="jobs in the larger run")


def main() -> int:
    return bench_main("memory", __doc__, measure, _add_args)


if __name__ == "__main__":
    sys.exit(main())
