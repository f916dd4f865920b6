"""Benchmark: several workers on one PostgreSQL run share one account's quota.

Three ``batcher run MANIFEST --db URL --rps 10`` processes work one run (its job table in a
PostgreSQL database, one output folder) against one emulator of quota Q = 10 requests/s (the
emulator's per-key sliding second, lognormal latency, median 1 s). They keep to one send
schedule in the database (``batcher.sharedpacing``), so together they should send at the
quota, not three times it. Beside them, as the baseline measured in the same run on the same
machine, one ``batcher run`` with its job table in its run folder (SQLite: one process pacing
itself) against an emulator of its own with the same quota, on the same manifest.

Figures, as fractions of Q:

* *accepted/s while sending*: the calls the emulator accepted over the span from the first
  accepted call to the last (of all three workers together, at the emulator);
* *throttled*: the emulator's 429s over all generation requests it received;
* the shared run's rate against the single process's.

Then, one after the other so that the two do not share the machine: the same three workers
with two lanes (``--lanes``: two keys, each an emulator account of quota Q/2), so that each
lane's schedule is shared by the three workers and the two lanes together give Q.

Goals: three workers told Q: together >= 0.95 of Q while sending, <= 1% throttled; two lanes
of Q/2 each through three workers: together >= 0.95 of Q, <= 1% throttled.

The server is the one ``BATCHER_BENCH_PG`` names (default
``postgresql://postgres@127.0.0.1:5432/postgres``); the bench creates
``batcher_bench_<random>`` and drops it at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    ROOT,
    BenchError,
    Child,
    EmulatorProcess,
    batcher_command,
    batcher_run,
    child_env,
    pin_self,
    shown,
    split_cores,
    work_dir,
)
from .manifests import cached_manifest
from .pgdb import scratch_database
from .report import Goal, Result, bench_main, table

Q = 10.0
WORKERS = 3
LATENCY = "lognormal:1000:0.4"


def _rate(stats: dict[str, Any]) -> tuple[float, int, int, int]:
    """(accepted/s while sending, accepted, throttled, requests) from the emulator's counters."""
    accepted = stats["accepted_by_model"].get("z-image-turbo")
    if not accepted or accepted["requests"] < 3:
        raise BenchError(f"the emulator accepted too few calls to measure a rate: {stats}")
    span = accepted["last"] - accepted["first"]
    n = int(accepted["requests"])
    return (n - 1) / span, n, int(stats["throttled"]), int(stats["generate_requests"])


LANES = """lanes:
  - name: a
    key_env: BENCH_LANE_KEY_A
    base_url: {base_url}
    quota: {quota:g}
  - name: b
    key_env: BENCH_LANE_KEY_B
    base_url: {base_url}
    quota: {quota:g}
"""


def _two_lanes(manifest: Path, work: Path, n: int, core: int | None) -> dict[str, Any]:
    """Three workers, two lanes of Q/2 (two emulator accounts): the figures of the run."""
    os.environ["BENCH_LANE_KEY_A"] = "sk-bench-lane-a-7f3e21"  # the children inherit them
    os.environ["BENCH_LANE_KEY_B"] = "sk-bench-lane-b-0c94d8"
    accounts = ["--account", "a=BENCH_LANE_KEY_A", "--account", "b=BENCH_LANE_KEY_B"]
    emu = EmulatorProcess(
        latency=LATENCY, rps=f"{Q / 2:g}", core=core, extra=["--seed", "7", *accounts]
    )
    children: list[Child] = []
    with scratch_database() as url:
        try:
            emu.start()
            out = work / "lanes"
            out.mkdir()
            lanes = work / "lanes.yaml"
            lanes.write_text(LANES.format(base_url=emu.base_url, quota=Q / 2), encoding="utf-8")
            _plan(manifest, out, url)
            command = batcher_command(
                "run", str(manifest), "--out", str(out), "--lanes", str(lanes), "--db", url,
                "--json", "--no-progress",
            )  # fmt: skip
            for i in range(WORKERS):
                children.append(
                    Child(
                        command,
                        cwd=ROOT,
                        env=child_env(),
                        stdout=work / f"lanes{i}.out",
                        stderr=work / f"lanes{i}.err",
                    )
                )
            deadline = time.perf_counter() + 4 * n / Q + 120
            measured = [c.wait(max(1.0, deadline - time.perf_counter())).check() for c in children]
            runs = [m.json() for m in measured]
            rate, accepted, throttled, requests = _rate(emu.stats())
        finally:
            for c in children:
                c.kill()
            emu.stop()
    done = sum(r["this_run"]["done"] for r in runs)
    if done != n:
        raise BenchError(f"the two-lane run finished {done} of {n} jobs")
    return {
        "accepted_per_s": rate,
        "accepted": accepted,
        "throttled": throttled,
        "requests": requests,
        "calls_by_worker": [int(r["this_run"]["calls"]) for r in runs],
        "command": shown(command),
    }


def _plan(manifest: Path, out: Path, url: str) -> None:
    done = Child(
        batcher_command("plan", str(manifest), "--out", str(out), "--db", url),
        cwd=ROOT,
        stdout=out.parent / "plan.out",
        stderr=out.parent / "plan.err",
    ).wait(300)
    done.check()


def measure(quick: bool, args: Any) -> Result:
    n = 300 if quick else 600
    work = work_dir("workers_shared")
    manifest = cached_manifest(n)
    client_cores, server_core = split_cores()
    emu_args = ["--seed", "7"]
    shared_emu = EmulatorProcess(latency=LATENCY, rps=f"{Q:g}", core=server_core, extra=emu_args)
    single_emu = EmulatorProcess(latency=LATENCY, rps=f"{Q:g}", core=server_core, extra=emu_args)
    children: list[Child] = []
    with scratch_database() as url:
        try:
            shared_emu.start()
            single_emu.start()
            pin_self(client_cores)
            out = work / "shared"
            out.mkdir()
            _plan(manifest, out, url)  # the import, once, before the workers start
            commands = [
                [*batcher_run(manifest, out, shared_emu.base_url, rps=f"{Q:g}"), "--db", url]
                for _ in range(WORKERS)
            ]
            commands.append(
                batcher_run(manifest, work / "single", single_emu.base_url, rps=f"{Q:g}")
            )
            timeout = 4 * n / Q + 120
            for i, command in enumerate(commands):
                children.append(
                    Child(
                        command,
                        cwd=ROOT,
                        env=child_env(),
                        stdout=work / f"client{i}.out",
                        stderr=work / f"client{i}.err",
                    )
                )
            deadline = time.perf_counter() + timeout
            measured = [c.wait(max(1.0, deadline - time.perf_counter())).check() for c in children]
            runs = [m.json() for m in measured]
            shared_rate, shared_ok, shared_thr, shared_req = _rate(shared_emu.stats())
            single_rate, single_ok, single_thr, single_req = _rate(single_emu.stats())
        finally:
            for c in children:
                c.kill()
            shared_emu.stop()
            single_emu.stop()
    done = sum(r["this_run"]["done"] for r in runs[:WORKERS])
    if done != n or runs[WORKERS]["done"] != n:
        raise BenchError(f"the shared run finished {done} of {n} jobs")
    two = _two_lanes(manifest, work, n, server_core)
    two_share = two["throttled"] / two["requests"] if two["requests"] else 0.0
    by_worker = [int(r["this_run"]["calls"]) for r in runs[:WORKERS]]
    shared_share = shared_thr / shared_req if shared_req else 0.0
    single_share = single_thr / single_req if single_req else 0.0
    makespan = max(m.wall for m in measured[:WORKERS])
    headers = ["client", "accepted/s while sending (of Q)", "throttled", "calls by worker"]
    body = [
        [
            f"{WORKERS} workers, one PostgreSQL run, told Q each",
            f"{shared_rate:.2f} ({shared_rate / Q:.3f})",
            f"{shared_thr} of {shared_req} ({shared_share:.1%})",
            " / ".join(str(c) for c in by_worker),
        ],
        [
            "1 worker, SQLite run folder, told Q (baseline)",
            f"{single_rate:.2f} ({single_rate / Q:.3f})",
            f"{single_thr} of {single_req} ({single_share:.1%})",
            str(runs[WORKERS]["this_run"]["calls"]),
        ],
        [
            "shared / baseline",
            f"{shared_rate / single_rate:.3f}x",
            "",
            "",
        ],
        [
            f"{WORKERS} workers, one PostgreSQL run, 2 lanes of Q/2 (run after the above)",
            f"{two['accepted_per_s']:.2f} ({two['accepted_per_s'] / Q:.3f})",
            f"{two['throttled']} of {two['requests']} ({two_share:.1%})",
            " / ".join(str(c) for c in two["calls_by_worker"]),
        ],
    ]
    goals = [
        Goal(
            text=f"{WORKERS} workers on one account told Q: together >= 0.95 of Q while "
            "sending, <= 1% throttled",
            met=shared_rate >= 0.95 * Q and shared_share <= 0.01,
            measured=f"{shared_rate / Q:.3f} of Q, {shared_share:.1%} throttled",
        ),
        Goal(
            text=f"2 lanes of Q/2 through {WORKERS} workers: together >= 0.95 of Q while "
            "sending, <= 1% throttled",
            met=two["accepted_per_s"] >= 0.95 * Q and two_share <= 0.01,
            measured=f"{two['accepted_per_s'] / Q:.3f} of Q, {two_share:.1%} throttled",
        ),
    ]
    return Result(
        name="workers_shared",
        title="Several workers sharing one quota (PostgreSQL)",
        quick=quick,
        sizes=f"N = {n} jobs, Q = {Q:g}/s, latency {LATENCY} ms, {WORKERS} workers side by "
        "side with the single-process baseline, then the two-lane run",
        table=table(headers, body),
        goals=goals,
        commands=[*(shown(c) for c in commands), two["command"]],
        figures={
            "shared_accepted_per_s": shared_rate,
            "shared_accepted": shared_ok,
            "shared_throttled": shared_thr,
            "shared_requests": shared_req,
            "single_accepted_per_s": single_rate,
            "single_accepted": single_ok,
            "single_throttled": single_thr,
            "single_requests": single_req,
            "calls_by_worker": by_worker,
            "shared_makespan_s": makespan,
            "two_lanes": two,
        },
        notes=[
            f"Each side has its own emulator: `python -m batcher.emulator --latency {LATENCY} "
            f"--rps {Q:g} --seed 7`; the shared run's import (`batcher plan --db`) runs first.",
            "The shared schedule keeps 97.5% of the rate told (a single process 98.5%): the "
            "wider margin lets a slot that a busy host reaches up to 20 ms late still go out; "
            "one up to 100 ms late goes out and moves the slots not yet handed out by its "
            "lateness past 20 ms; one reached later is given back (a hole in the schedule).",
            "Two lanes: one emulator with two accounts of Q/2 each (`--account a=... "
            f"--account b=... --rps {Q / 2:g}`), a lanes file naming a key for each; the three "
            "workers share each lane's schedule.",
        ],
    )


def main() -> int:
    return bench_main("workers_shared", __doc__, measure)


if __name__ == "__main__":
    sys.exit(main())
