"""Run every benchmark within the ten-minute budget and write ``bench/RESULTS.md``.

``make bench`` runs ``python -m bench.run_all``. Each benchmark runs as its own process
(``python -m bench.NAME [--quick]``), one after another, so none disturbs another's figures;
each saves its result in ``bench/_work/results/``, from which this writes ``bench/RESULTS.md``.

The sizes are chosen to fit ten minutes on a 2-core machine: the headline benchmarks run at
the issue's sizes (import and resume at 1,000,000 rows, overhead at 5,000 jobs, downloads of
2,000 images, pacing's 600 jobs per client with its four clients side by side), memory
comparing 4,000 with 40,000 jobs instead of 10,000 with 100,000 (a 100,000-job run alone takes
minutes here). When the budget runs short, the remaining benchmarks run with ``--quick
--no-profile``.

The section of RESULTS.md between ``<!-- analysis -->`` and ``<!-- /analysis -->`` is written
by hand (what the profiles mean, what to fix) and kept as it is when the file is rewritten.

Options: ``--only NAME ...`` runs some of them; ``--quick`` runs all of them quick;
``--budget SECONDS`` (default 570); ``--report-only`` rewrites RESULTS.md from the saved results.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import PYTHON, RESULTS, ROOT, child_env, core_count
from .report import Result, note

RESULTS_MD = ROOT / "bench" / "RESULTS.md"
ANALYSIS = re.compile(r"<!-- analysis -->.*?<!-- /analysis -->", re.S)

# (module, its arguments in run_all, rough seconds with them and with --quick --no-profile)
PLAN: list[tuple[str, list[str], int, int]] = [
    ("pacing", ["--side-by-side"], 90, 50),
    ("slow_start", [], 170, 170),
    ("overhead", [], 60, 20),
    ("import_scale", [], 130, 40),  # the short-prompt import too
    ("memory", ["--small", "4000", "--large", "40000"], 120, 120),
    ("resume", [], 110, 30),
    ("download", [], 80, 25),
    ("export_scale", [], 150, 40),  # the 100,000-image folder is made once, then kept
    ("report_scale", [], 240, 60),
    ("workers_shared", [], 170, 90),
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_results(results: list[Result], total: float, order: list[str]) -> None:
    """RESULTS.md from the saved results, keeping the hand-written analysis."""
    analysis = "<!-- analysis -->\n(no analysis yet)\n<!-- /analysis -->"
    if RESULTS_MD.exists():
        found = ANALYSIS.search(RESULTS_MD.read_text())
        if found:
            analysis = found.group(0)
    by_name = {r.name: r for r in results}
    ordered = [by_name[n] for n in order if n in by_name]
    dates = sorted(r.date for r in ordered)
    lines = [
        "# Benchmark results",
        "",
        f"Figures measured {dates[0] if dates else '-'} to {dates[-1] if dates else '-'} UTC "
        f"(the last full `make bench`, i.e. `python -m bench.run_all`, took {total:.0f} s; a "
        "section dated later was re-run alone); "
        f"a {core_count()}-core machine ({cpu_model()}), shared with "
        f"other test runs, so every figure is a ratio against a baseline measured in the same "
        f"run; Python {platform.python_version()}; "
        f"measured at commit {', '.join(sorted({r.commit for r in ordered})) or 'unknown'}.",
        "",
        "Each benchmark runs alone with `python -m bench.NAME [--quick]`; the sizes each figure "
        "used are given with it. The emulator always runs in its own process pinned to one "
        "core, the client measured on the other; client CPU and peak RSS come from `wait4` on "
        "the client process alone.",
        "",
        "## Goals",
        "",
        "| benchmark | goal | result | measured |",
        "|---|---|---|---|",
    ]
    for r in ordered:
        for g in r.goals:
            lines.append(
                f"| {r.title} | {g.text} | {'met' if g.met else '**missed**'} | {g.measured} |"
            )
    lines += ["", "## Analysis of the misses", "", analysis, ""]
    for r in ordered:
        lines += r.markdown()
    RESULTS_MD.write_text("\n".join(lines).rstrip() + "\n")


def _previous_total() -> float:
    """The total time the last full run_all reported (kept in RESULTS.md's first lines)."""
    if RESULTS_MD.exists():
        found = re.search(r"took (\d+) s;", RESULTS_MD.read_text())
        if found:
            return float(found.group(1))
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--quick", action="store_true", help="every benchmark with --quick")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all of them")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md from the saved results (e.g. after re-running one benchmark)",
    )
    args = parser.parse_args()
    if args.report_only:
        results = [Result.load(p) for p in sorted(RESULTS.glob("*.json"))]
        write_results(results, _previous_total(), [p[0] for p in PLAN])
        print(f"{RESULTS_MD.relative_to(ROOT)} written from {len(results)} saved results")
        return 0

    plan = [p for p in PLAN if not args.only or p[0] in args.only]
    started = time.perf_counter()
    failed: list[str] = []
    note(f"run_all started: {', '.join(p[0] for p in plan)}")
    for stale in RESULTS.glob("*.json") if not args.only else []:
        stale.unlink()  # a full run_all reports only what it measured
    for i, (name, extra, estimate, _) in enumerate(plan):
        elapsed = time.perf_counter() - started
        rest = sum(p[3] for p in plan[i + 1 :])  # the others, were they all cut short
        left = args.budget - elapsed
        flags = list(extra)
        if args.quick or left < estimate + rest:
            flags = ["--quick", "--no-profile"]
        print(f"\n=== bench.{name} {' '.join(flags)} ({elapsed:.0f} s so far) ===", flush=True)
        process = subprocess.Popen(
            [PYTHON, "-m", f"bench.{name}", *flags],
            cwd=ROOT,
            env=child_env(),
            start_new_session=True,  # on timeout, stop it with its emulators and clients
        )
        try:
            code = process.wait(timeout=max(120.0, left + 60))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            code = -1
        if code != 0:
            failed.append(name)
    total = time.perf_counter() - started
    results = [Result.load(p) for p in sorted(RESULTS.glob("*.json"))]
    write_results(results, total, [p[0] for p in PLAN])
    print(f"\nall benchmarks: {total:.0f} s; {RESULTS_MD.relative_to(ROOT)} written", flush=True)
    if failed:
        print(f"could not measure: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
