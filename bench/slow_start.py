"""Benchmark: slow start, batcher told a wrong --rps, against the emulator's quota.

Two scenarios, each run twice (one client after another, or with ``--side-by-side`` all at
once: faster, but on a busy machine the clients' event loops then lag and every figure drops):
by batcher as it is (slow start from the default
quota, 2/s) and, as the baseline measured in the same run, by batcher starting at the rate it
was told (``--start-rps`` equal to ``--rps``: no slow start, as before it existed). Every client
has its own emulator subprocess (latency lognormal, median 1 s, sigma 0.4; the quota is the
emulator's per-key sliding second):

* A, told 500x the quota: ``--rps 1000`` against a 2/s quota, N = 100 jobs. Figure: throttled
  answers in its first 100 calls. With N = 100 jobs the run makes 100 + T calls, T of them
  throttled, so T (the emulator's 429 count) bounds the throttled answers among the first 100
  calls from above.
* B, told twice a quota higher than the start: ``--rps 20`` against a 10/s quota. Figures: the
  accepted rate over the whole run, and once converged (the second half of the accepted calls,
  by the time each went out: from ``batcher export``, its answer's time less its latency), as
  fractions of the quota.

Goals (the slow start's promise): A at most 5 throttled answers in the first 100 calls; B
converged to >= 0.95 of the quota.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import (
    ROOT,
    BenchError,
    Child,
    EmulatorProcess,
    batcher_command,
    batcher_run,
    pin_self,
    run_measured,
    shown,
    split_cores,
    work_dir,
)
from .manifests import cached_manifest
from .report import Goal, Result, bench_main, table

LATENCY = "lognormal:1000:0.4"


@dataclass
class Client:
    name: str
    quota: float
    told: float
    start: float | None  # --start-rps; None: batcher's default (slow start)
    jobs: int
    emulator: EmulatorProcess
    command: list[str] | None = None
    child: Child | None = None


def _send_times(out: Path, logs: Path) -> list[float]:
    """When each generated job's accepted call went out (unix seconds), from ``batcher export``:
    the time its answer was recorded less the call's latency. (Answer times alone would stretch
    the last stretch by the latency's tail.)"""
    measured = run_measured(batcher_command("export", str(out)), cwd=ROOT, timeout=120, logs=logs)
    measured.check()
    times = []
    for line in measured.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("generated_at") and rec.get("latency_ms") is not None:
            answered = dt.datetime.fromisoformat(rec["generated_at"]).timestamp()
            times.append(answered - rec["latency_ms"] / 1000.0)
    return sorted(times)


def _figures(c: Client, out: Path, logs: Path) -> dict[str, Any]:
    assert c.child is not None and c.child.result is not None
    data = c.child.result.check().json()
    if data["done"] != c.jobs:
        raise BenchError(f"{c.name} finished {data['done']} of {c.jobs} jobs")
    stats = c.emulator.stats()
    run = data["this_run"]
    times = _send_times(out, logs)
    half = times[len(times) // 2 :]
    converged = (len(half) - 1) / (half[-1] - half[0]) if len(half) > 1 else None
    return {
        "client": c.name,
        "quota": c.quota,
        "told": c.told,
        "slow_start": c.start is None,
        "jobs": c.jobs,
        "requests": stats["generate_requests"],
        "throttled": stats["throttled"],
        "accepted_per_s": run["calls_per_second"],
        "converged_per_s": converged,
        "elapsed_s": data["elapsed_seconds"],
    }


def measure(quick: bool, args: argparse.Namespace) -> Result:
    work = work_dir("slow_start")
    n_a = 100  # the figure is about the first 100 calls: never fewer jobs
    n_b = 200 if quick else 400
    client_cores, server_core = split_cores()
    clients = []
    for scenario, quota, told, jobs in (("A", 2.0, 1000.0, n_a), ("B", 10.0, 20.0, n_b)):
        for start in (None, told):
            name = f"{scenario}: told {told:g}/s, quota {quota:g}/s, " + (
                "slow start" if start is None else "no slow start (baseline)"
            )
            emu = EmulatorProcess(
                latency=LATENCY, rps=f"{quota:g}", core=server_core, extra=["--seed", "11"]
            )
            clients.append(Client(name, quota, told, start, jobs, emu))
    try:
        for c in clients:
            c.emulator.start()
        pin_self(client_cores)
        for i, c in enumerate(clients):
            cmd = batcher_run(
                cached_manifest(c.jobs), work / f"out{i}", c.emulator.base_url, rps=f"{c.told:g}"
            )
            if c.start is not None:
                cmd += ["--start-rps", f"{c.start:g}"]
            c.command = cmd
        timeout = 4 * n_a / 2.0 + 180

        def start(i: int, c: Client) -> Child:
            assert c.command is not None
            out, err = work / f"c{i}.out", work / f"c{i}.err"
            c.child = Child(c.command, cwd=ROOT, stdout=out, stderr=err)
            return c.child

        if args.side_by_side:
            children = [start(i, c) for i, c in enumerate(clients)]
            deadline = time.perf_counter() + timeout
            for child in children:
                child.wait(max(1.0, deadline - time.perf_counter()))
        else:
            for i, c in enumerate(clients):
                start(i, c).wait(timeout)
        rows = [_figures(c, work / f"out{i}", work / f"export{i}") for i, c in enumerate(clients)]
    finally:
        for c in clients:
            if c.child is not None:
                c.child.kill()
            c.emulator.stop()

    def frac(value: float | None, quota: float) -> str:
        return "--" if value is None else f"{value:.2f} ({value / quota:.3f})"

    headers = [
        "client",
        "calls",
        "throttled",
        "accepted/s whole run (of Q)",
        "accepted/s 2nd half (of Q)",
        "elapsed s",
    ]
    body = [
        [
            r["client"],
            r["requests"],
            f"{r['throttled']} ({r['throttled'] / r['requests']:.1%})",
            frac(r["accepted_per_s"], r["quota"]),
            frac(r["converged_per_s"], r["quota"]),
            f"{r['elapsed_s']:.1f}",
        ]
        for r in rows
    ]
    a_new, a_old, b_new, b_old = rows
    body.append(
        [
            "A: slow start / baseline",
            f"{a_new['requests'] / a_old['requests']:.3f}x",
            f"{a_new['throttled']} vs {a_old['throttled']}",
            "",
            "",
            f"{a_new['elapsed_s'] / a_old['elapsed_s']:.3f}x",
        ]
    )
    if b_new["converged_per_s"] and b_old["converged_per_s"]:
        body.append(
            [
                "B: slow start / baseline",
                f"{b_new['requests'] / b_old['requests']:.3f}x",
                f"{b_new['throttled']} vs {b_old['throttled']}",
                f"{b_new['accepted_per_s'] / b_old['accepted_per_s']:.3f}x",
                f"{b_new['converged_per_s'] / b_old['converged_per_s']:.3f}x",
                f"{b_new['elapsed_s'] / b_old['elapsed_s']:.3f}x",
            ]
        )
    converged = b_new["converged_per_s"] or 0.0
    goals = [
        Goal(
            text="A (told 500x a 2/s quota): <= 5 throttled answers in the first 100 calls",
            met=a_new["throttled"] <= 5,
            measured=f"at most {a_new['throttled']} (the baseline: {a_old['throttled']})",
        ),
        Goal(
            text="B (told 20/s, quota 10/s): converged to >= 0.95 of the quota",
            met=converged >= 0.95 * b_new["quota"],
            measured=f"{converged / b_new['quota']:.3f} of Q in the second half, "
            f"{(b_new['accepted_per_s'] or 0) / b_new['quota']:.3f} over the whole run",
        ),
    ]
    return Result(
        name="slow_start",
        title="Slow start: a wrong --rps costs a handful of 429s",
        quick=quick,
        sizes=f"A: N = {n_a} jobs; B: N = {n_b} jobs; latency {LATENCY} ms; each client with "
        "its own emulator, "
        + ("all four side by side" if args.side_by_side else "one after another"),
        table=table(headers, body),
        goals=goals,
        commands=[shown(c.command or []) for c in clients],
        figures={"rows": rows},
        notes=[
            "Throttled counts are the emulator's 429s over the whole run: for A they bound the "
            "throttled answers among the first 100 calls from above.",
            "Accepted/s is batcher's `calls_per_second` (accepted calls only, first to last); "
            "the second half is measured from the accepted calls' send times (`generated_at` "
            "less `latency_ms`, from `batcher export`).",
        ],
    )


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--side-by-side", action="store_true", help="run the four clients at once (faster)"
    )


def main() -> int:
    return bench_main("slow_start", __doc__, measure, _add_args)


if __name__ == "__main__":
    sys.exit(main())
