"""Benchmark: the job table in PostgreSQL (``--db``), against the server's own tools.

Two figures, each a ratio or a rate measured in one run on the same server:

* **Import**: ``batcher plan MANIFEST --db URL`` of a 1,000,000-row CSV (the import bench's
  manifest: ``id,prompt,size,seed,category``) into an empty database, against ``psql \\copy``
  of the same file into a table of the CSV's columns keyed by ``id`` (the physical cost of
  getting those rows into that server). Goal: <= 2x.
* **Claims**: 8 claimers (8 stores, each with its own connections, in one process) taking
  jobs with ``JobStore.claim(limit=16)`` from the imported table for a few seconds, every
  claim a ``FOR UPDATE SKIP LOCKED`` transaction; jobs claimed per second in total, and a
  check that no job was handed out twice. Goal: >= 2,000 jobs/s.

The server is the one ``BATCHER_BENCH_PG`` names (a URL of a database to connect to for
``CREATE DATABASE``; default ``postgresql://postgres@127.0.0.1:5432/postgres``); the bench
creates ``batcher_bench_<random>`` and drops it at the end. ``--quick``: 100,000 rows.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from jobs.store import JobStore

from .common import BenchError, batcher_command, child_env, work_dir
from .manifests import cached_manifest
from .pgdb import scratch_database

CLAIMERS = 8
CLAIM_LIMIT = 16
CLAIM_SECONDS = 5.0


def _psql_copy(url: str, csv_path: Path) -> float:
    """Seconds for ``psql \\copy`` of the CSV into a table of its columns keyed by id."""
    if shutil.which("psql") is None:
        raise BenchError("psql is not installed: no reference to measure against")
    u = make_url(url)
    base = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", u.host or "127.0.0.1"]
    base += ["-p", str(u.port or 5432), "-U", u.username or "postgres", "-d", u.database or ""]
    subprocess.run(
        [
            *base,
            "-c",
            "CREATE TABLE copied (id TEXT PRIMARY KEY, prompt TEXT NOT NULL, "
            "size TEXT NOT NULL, seed BIGINT NOT NULL, category TEXT)",
        ],
        check=True,
        timeout=60,
    )
    start = time.perf_counter()
    subprocess.run(
        [*base, "-c", f"\\copy copied FROM '{csv_path}' WITH (FORMAT csv, HEADER true)"],
        check=True,
        timeout=1800,
    )
    return time.perf_counter() - start


def _batcher_plan(url: str, csv_path: Path, out: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        batcher_command("plan", str(csv_path), "--out", str(out), "--db", url, "--json"),
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(f"batcher plan failed: {done.stderr.strip()}")
    return elapsed


async def _claims(url: str) -> tuple[int, float, int]:
    """(jobs claimed, seconds, jobs handed out twice) by CLAIMERS concurrent stores."""
    stores = [await JobStore.open(url, create=False) for _ in range(CLAIMERS)]
    seen: dict[str, int] = {}
    try:
        for s in stores:  # warm each pool's connection up (not timed)
            await s.get_meta("schema_version")
        stop = time.perf_counter() + CLAIM_SECONDS

        async def claimer(store: JobStore) -> int:
            n = 0
            while time.perf_counter() < stop:
                for c in await store.claim(limit=CLAIM_LIMIT, lease_seconds=600, worker="bench"):
                    seen[c.id] = seen.get(c.id, 0) + 1
                    n += 1
            return n

        start = time.perf_counter()
        counts = await asyncio.gather(*(claimer(s) for s in stores))
        elapsed = time.perf_counter() - start
    finally:
        for s in stores:
            await s.close()
    return sum(counts), elapsed, sum(1 for v in seen.values() if v > 1)


def measure(quick: bool) -> dict[str, Any]:
    rows = 100_000 if quick else 1_000_000
    csv_path = cached_manifest(rows)
    work = work_dir("pg_scale")
    with scratch_database() as url:
        copy_s = _psql_copy(url, csv_path)
        plan_s = _batcher_plan(url, csv_path, work / "run")
        claimed, claim_s, twice = asyncio.run(_claims(url))
    return {
        "rows": rows,
        "psql_copy_s": copy_s,
        "batcher_plan_s": plan_s,
        "import_ratio": plan_s / copy_s,
        "claimers": CLAIMERS,
        "claim_limit": CLAIM_LIMIT,
        "claimed": claimed,
        "claim_s": claim_s,
        "claims_per_s": claimed / claim_s,
        "claimed_twice": twice,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows, not 1,000,000")
    args = parser.parse_args(argv)
    r = measure(args.quick)
    rows = f"{r['rows']:,}"
    print("## PostgreSQL scale\n")
    print("| what | seconds | ratio |")
    print("|---|---|---|")
    print(f"| psql \\copy, {rows} rows into a table keyed by id | {r['psql_copy_s']:.2f} | 1.00x |")
    print(
        f"| batcher plan --db, {rows} new | {r['batcher_plan_s']:.2f} | {r['import_ratio']:.2f}x |"
    )
    ok_import = r["import_ratio"] <= 2
    ok_claims = r["claims_per_s"] >= 2000 and r["claimed_twice"] == 0
    print(
        f"\n- Goal import <= 2x psql \\copy: **{'met' if ok_import else 'MISSED'}** "
        f"({r['batcher_plan_s']:.1f} s vs {r['psql_copy_s']:.1f} s = {r['import_ratio']:.2f}x)"
    )
    print(
        f"- Goal {r['claimers']} claimers (limit {r['claim_limit']}) on the {rows}-job table "
        f">= 2,000 jobs/s: **{'met' if ok_claims else 'MISSED'}** ({r['claims_per_s']:,.0f} "
        f"jobs/s, {r['claimed']:,} in {r['claim_s']:.1f} s; {r['claimed_twice']} handed out "
        "twice)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
