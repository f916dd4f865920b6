"""Benchmark 3, import scale: ``batcher plan`` of a 1,000,000-row CSV against ``sqlite3 .import``.

The reference is the sqlite3 command-line shell importing the same file into a comparable
table (the CSV's columns, ``id`` the primary key, the same WAL and ``synchronous=FULL``
pragmas as batcher's database): the physical cost of getting those rows into SQLite on this
machine. If ``sqlite3`` is not installed, Python's ``sqlite3.executemany`` over ``csv.reader``
stands in, and the table says so. Then, on the same file:

* ``batcher plan MANIFEST --out DIR --json``: validate and import (wall time, peak RSS);
* the same again: a re-import that must add nothing, in no more time than the import;
* claim latency: with 99% of the imported jobs marked done (one UPDATE through sqlite3),
  ``JobStore.claim(limit=64)`` timed 30 times (each claim released again, untimed), against
  the same on a 10,000-job table that is 99% done too (the ratio says whether claiming scans).

Then the same first import, against the same reference, of a CSV of short prompts
(``id,prompt,size,seed``, ~50 characters a prompt): the fewer bytes a row, the more batcher's
per-row cost shows against sqlite3's.

Goal: import time <= 3x sqlite3's for both CSVs, peak RSS < 300 MB; the re-import adds
nothing and takes no longer than the import; a claim takes milliseconds on the big table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from jobs.manifest import HELPER_MIN_BYTES

from . import profiling
from .common import (
    PYTHON,
    ROOT,
    BenchError,
    Measured,
    batcher_command,
    run_measured,
    shown,
    work_dir,
)
from .manifests import cached_manifest, mark_done, store_planned
from .report import Goal, Result, bench_main, table, want_profile

SQLITE3 = "/usr/bin/sqlite3"
CLAIMS = 30
CLAIM_LIMIT = 64
SMALL = 10_000
REFERENCE_DDL = (
    "CREATE TABLE jobs (id TEXT PRIMARY KEY, prompt TEXT NOT NULL, size TEXT NOT NULL, "
    "seed INTEGER NOT NULL, category TEXT)"
)
# The short-prompt CSV has no category column.
SHORT_DDL = REFERENCE_DDL.replace(", category TEXT)", ")")


def sqlite_reference(
    manifest: Path, db: Path, timeout: float, ddl: str = REFERENCE_DDL
) -> tuple[Measured, str]:
    """Import ``manifest`` with the sqlite3 shell (or Python's module when it is missing)
    into a table made by ``ddl``."""
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    shell = SQLITE3 if Path(SQLITE3).exists() else shutil.which("sqlite3")
    if shell is not None:
        command = [
            shell,
            "-batch",
            str(db),
            "PRAGMA journal_mode=WAL;",
            "PRAGMA synchronous=FULL;",
            ddl + ";",
            f".import --csv --skip 1 {manifest} jobs",
        ]
        label = "sqlite3 .import (the shell)"
    else:
        command = [PYTHON, "-m", "bench.import_scale", "--python-import", str(manifest), str(db)]
        command.append(ddl)
        label = "Python sqlite3 executemany (no sqlite3 shell on this machine)"
    measured = run_measured(command, cwd=db.parent, timeout=timeout, logs=db.with_suffix(".log"))
    measured.check()
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM jobs").fetchone()[0]
    return measured, f"{label}: {rows:,} rows"


def _python_import(manifest: Path, db: Path, ddl: str) -> int:
    """The fallback reference: csv.reader into executemany, one transaction."""
    import csv

    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute(ddl)
    with manifest.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        marks = ", ".join("?" * len(next(reader)))
        con.execute("BEGIN")
        con.executemany(f"INSERT INTO jobs VALUES ({marks})", reader)
        con.execute("COMMIT")
    con.close()
    return 0


def _claim_child(db: Path, claims: int, limit: int) -> int:
    """Time ``claims`` calls of ``JobStore.claim(limit=...)``; print the times as JSON."""
    import anyio

    from jobs import JobStore

    async def go() -> list[float]:
        times: list[float] = []
        async with await JobStore.open(db, create=False) as store:
            for _ in range(claims):
                started = time.perf_counter()
                got = await store.claim(limit=limit, lease_seconds=600)
                times.append(time.perf_counter() - started)
                if len(got) != limit:
                    raise SystemExit(f"claimed {len(got)}, expected {limit}")
                for claim in got:  # untimed: keep the table 99% done for the next claim
                    await store.release(claim.id, claim.token)
        return times

    print(json.dumps({"seconds": anyio.run(go)}))
    return 0


def claim_latency(db: Path, work: Path) -> dict[str, float]:
    command = [
        PYTHON,
        "-m",
        "bench.import_scale",
        "--claim-child",
        str(db),
        str(CLAIMS),
        str(CLAIM_LIMIT),
    ]
    m = run_measured(command, cwd=ROOT, timeout=120, logs=work / f"claims-{db.parent.name}.log")
    seconds = sorted(m.check().json()["seconds"])
    return {
        "median_ms": 1000 * statistics.median(seconds),
        "p90_ms": 1000 * seconds[int(0.9 * (len(seconds) - 1))],
        "max_ms": 1000 * seconds[-1],
    }


def plan(manifest: Path, out: Path, work: Path, label: str, timeout: float) -> Measured:
    command = batcher_command("plan", str(manifest), "--out", str(out), "--json")
    return run_measured(command, cwd=work, timeout=timeout, logs=work / f"{label}.log").check()


def measure(quick: bool, args: argparse.Namespace) -> Result:
    n = 200_000 if quick else 1_000_000
    timeout = 60 + n / 1000  # a generous 1 ms a row, far beyond the goal
    work = work_dir("import_scale")
    manifest = cached_manifest(n)
    mb = manifest.stat().st_size / 1e6

    reference, ref_label = sqlite_reference(manifest, work / "reference.db", timeout)
    first = plan(manifest, work / "run", work, "plan-1", timeout)
    first_info = first.json()
    if first_info["new"] != n:
        raise BenchError(f"batcher plan imported {first_info['new']} of {n}")
    store_planned(n, work / "run" / "batcher.db")  # bench.resume starts from this folder
    again = plan(manifest, work / "run", work, "plan-2", timeout)
    again_info = again.json()

    # Claim latency: the big table, 99% done, against a small one, 99% done too.
    big_db = work / "run" / "batcher.db"
    big_left = mark_done(big_db)
    small = plan(cached_manifest(SMALL), work / "small", work, "plan-small", timeout)
    del small
    small_left = mark_done(work / "small" / "batcher.db")
    big_claim = claim_latency(big_db, work)
    small_claim = claim_latency(work / "small" / "batcher.db", work)

    # Short prompts: the same first import, against the same reference, of ~50-character ones.
    short_manifest = cached_manifest(n, short=True)
    short_ref, short_label = sqlite_reference(
        short_manifest, work / "reference-short.db", timeout, SHORT_DDL
    )
    short = plan(short_manifest, work / "run-short", work, "plan-short", timeout)
    short_info = short.json()
    if short_info["new"] != n:
        raise BenchError(f"batcher plan imported {short_info['new']} of {n} short rows")
    short_ratio = short.wall / short_ref.wall

    ratio = first.wall / reference.wall
    # A manifest this big is read by a helper process (jobs.readahead). ru_maxrss is the larger
    # process's peak, so the two together stay under twice it.
    processes = 2 if manifest.stat().st_size >= HELPER_MIN_BYTES else 1
    together = f" a process, < {2 * first.maxrss_mb:.0f} MB together" if processes == 2 else ""
    headers = ["step", "wall s", "vs sqlite3", "rows/s", "peak RSS MB", "CPU s"]
    rows: list[list[Any]] = [
        [
            ref_label,
            reference.wall,
            "1.00x",
            n / reference.wall,
            reference.maxrss_mb,
            reference.cpu,
        ],
        [
            f"batcher plan: {first_info['new']:,} new",
            first.wall,
            f"{ratio:.2f}x",
            n / first.wall,
            first.maxrss_mb,
            first.cpu,
        ],
        [
            f"batcher plan again: {again_info['new']:,} new, {again_info['unchanged']:,} unchanged",
            again.wall,
            f"{again.wall / reference.wall:.2f}x",
            n / again.wall,
            again.maxrss_mb,
            again.cpu,
        ],
        [
            f"short prompts: {short_label}",
            short_ref.wall,
            "1.00x",
            n / short_ref.wall,
            short_ref.maxrss_mb,
            short_ref.cpu,
        ],
        [
            f"short prompts: batcher plan: {short_info['new']:,} new",
            short.wall,
            f"{short_ratio:.2f}x",
            n / short.wall,
            short.maxrss_mb,
            short.cpu,
        ],
    ]
    claim_headers = ["claim(limit=64), 30 times", "median ms", "p90 ms", "max ms", "jobs to do"]
    claim_rows: list[list[Any]] = [
        [f"{n:,} jobs, 99% done", *big_claim.values(), big_left],
        [f"{SMALL:,} jobs, 99% done", *small_claim.values(), small_left],
        [
            "ratio big / small",
            f"{big_claim['median_ms'] / small_claim['median_ms']:.2f}x",
            f"{big_claim['p90_ms'] / small_claim['p90_ms']:.2f}x",
            "",
            "",
        ],
    ]
    goals = [
        Goal(
            text="import <= 3x sqlite3 .import",
            met=ratio <= 3.0,
            measured=f"{first.wall:.1f} s vs {reference.wall:.1f} s = {ratio:.2f}x",
        ),
        Goal(
            text="import of short prompts (~50 characters) <= 3x sqlite3 .import",
            met=short_ratio <= 3.0,
            measured=f"{short.wall:.1f} s vs {short_ref.wall:.1f} s = {short_ratio:.2f}x",
        ),
        Goal(
            text="import peak RSS < 300 MB",
            met=max(first.maxrss_mb, short.maxrss_mb) * processes < 300,
            measured=f"{first.maxrss_mb:.0f} MB{together} (re-import {again.maxrss_mb:.0f} MB, "
            f"short prompts {short.maxrss_mb:.0f} MB)",
        ),
        Goal(
            text="a re-import adds nothing",
            met=again_info["new"] == 0 and again_info["unchanged"] == n,
            measured=f"{again_info['new']} new, {again_info['unchanged']:,} unchanged",
        ),
        Goal(
            text="a re-import takes no longer than the import",
            met=again.wall <= first.wall,
            measured=f"{again.wall:.1f} s vs {first.wall:.1f} s = {again.wall / first.wall:.2f}x",
        ),
        Goal(
            text="a claim on the big table 99% done takes milliseconds (not a scan)",
            met=big_claim["median_ms"] < 50
            and big_claim["median_ms"] < 3 * small_claim["median_ms"],
            measured=f"{big_claim['median_ms']:.1f} ms median vs {small_claim['median_ms']:.1f} "
            f"ms on {SMALL:,} jobs",
        ),
    ]
    result = Result(
        name="import_scale",
        title="3. Import scale",
        quick=quick,
        sizes=f"N = {n:,} CSV rows, {mb:.0f} MB; claims on {n:,} and {SMALL:,} jobs",
        table=[*table(headers, rows), "", *table(claim_headers, claim_rows)],
        goals=goals,
        commands=[
            shown(first.command),
            shown(reference.command),
            shown(short.command),
            shown(short_ref.command),
        ],
        figures={
            "reference_s": reference.wall,
            "plan_s": first.wall,
            "replan_s": again.wall,
            "plan_rss_mb": first.maxrss_mb,
            "short_reference_s": short_ref.wall,
            "short_plan_s": short.wall,
            "claim_big": big_claim,
            "claim_small": small_claim,
        },
        notes=[
            "Wall times are whole processes (interpreter start-up included for batcher, "
            "about 0.5 s). The CSV columns: id, prompt (~90 characters, one in eight in "
            "Chinese), size, seed, category (a template variable); the short-prompt CSV: id, "
            "prompt (~50 characters), size, seed.",
            "Claim times include the write transaction with its fsync (synchronous=FULL).",
        ],
    )
    if want_profile(args, all(g.met for g in goals[:5])):
        try:
            _profile_import(result, work, quick, first_missed=not (goals[0].met and goals[1].met))
        except BenchError as exc:
            result.notes.append(f"No py-spy profile: {exc}")
    return result


def _profile_import(result: Result, work: Path, quick: bool, *, first_missed: bool) -> None:
    """Profile ``batcher plan`` (first import, or the re-import) on up to 200,000 rows."""
    n = 200_000
    manifest = cached_manifest(n)
    out = work / "profiled"
    if out.exists():
        shutil.rmtree(out)
    command = batcher_command("plan", str(manifest), "--out", str(out), "--json")
    label = "import"
    if not first_missed:
        run_measured(command, cwd=work, timeout=300, logs=work / "profiled-first.log").check()
        label = "re-import"
    raw = profiling.record(
        command,
        out=work / f"profile-{label}.txt",
        cwd=work,
        timeout=300,
        mode="wall",
        subprocesses=True,  # a manifest this big is read by another process (jobs.readahead)
    )
    views = [("main", "main thread"), ("other", "helper threads (SQLite)")]
    if label == "import" and manifest.stat().st_size >= HELPER_MIN_BYTES:
        views.append(("readahead", "the process reading the manifest"))
    for thread, what in views:
        prof = profiling.summarise(
            raw, command=shown(command), rate=200, mode="wall", thread=thread
        )
        result.profiles.append(
            prof.markdown(f"batcher plan, {label} of {n:,} rows, {what}", top=20)
        )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--python-import":
        return _python_import(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    if len(sys.argv) > 1 and sys.argv[1] == "--claim-child":
        return _claim_child(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    return bench_main("import_scale", __doc__, measure)


if __name__ == "__main__":
    sys.exit(main())
