"""Helpers shared by the integration and acceptance tiers: job specs, a runner wired to a real
emulator and a real SQLite file, and the invariants every fault test ends on."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from batcher.client import DashScopeClient
from batcher.layout import RunLayout
from batcher.png import PngVerifier
from batcher.pool import Runner, RunOptions, RunResult
from jobs import JobSpec, JobStore

REPO = Path(__file__).resolve().parent.parent


def make_specs(
    n: int, *, size: str = "512*512", prefix: str = "job", start: int = 0
) -> list[JobSpec]:
    out = []
    for i in range(start, start + n):
        output = f"{prefix}/{prefix}-{i:05d}.png"
        out.append(
            JobSpec(
                id=f"{prefix}-{i:05d}",
                model="z-image-turbo",
                prompt=f"product photo number {i} of a wooden chair",
                size=size,
                seed=1000 + i,
                prompt_extend=False,
                output=output,
                output_key=output.casefold(),
                line=i + 2,
            )
        )
    return out


FAST = RunOptions(
    rps=10_000.0,
    concurrency=16,
    max_attempts=5,
    request_timeout=5.0,
    download_timeout=5.0,
    backoff_base=0.01,
    backoff_cap=0.05,
    lease_seconds=30.0,
    seed=7,
)


async def run_once(
    store: JobStore,
    layout: RunLayout,
    base_url: str,
    *,
    options: RunOptions = FAST,
    api_key: str = "sk-test-key",
) -> tuple[Runner, RunResult]:
    async with aiohttp.ClientSession() as session:
        client = DashScopeClient(
            session, base_url=base_url, api_key=api_key, request_timeout=options.request_timeout
        )
        runner = Runner(store=store, client=client, session=session, layout=layout, options=options)
        result = await runner.run()
    return runner, result


def png_size(path: Path) -> tuple[int, int]:
    v = PngVerifier()
    v.feed(path.read_bytes())
    return v.finish()


def check_invariants(root: Path) -> dict[str, int]:
    """The promises of issue 5, checked on a run folder. Returns counts per state."""
    layout = RunLayout(root)
    con = sqlite3.connect(layout.db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute(
            "SELECT id, state, output, sha256, bytes, width, height FROM jobs"
        ).fetchall()
    finally:
        con.close()
    counts: dict[str, int] = {}
    outputs: set[str] = set()
    for job_id, state, output, sha, size, width, height in rows:
        counts[state] = counts.get(state, 0) + 1
        assert output.casefold() not in outputs, f"two jobs share {output}"
        outputs.add(output.casefold())
        if state == "done":
            path = layout.images / output
            assert path.is_file(), f"{job_id} is done but {path} is missing"
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha, f"{job_id}: hash differs"
            assert len(data) == size
            assert png_size(path) == (width, height)
    leftovers = [
        os.path.join(d, f)
        for d, _, files in os.walk(layout.images)
        for f in files
        if f.endswith(".part")
    ]
    assert not leftovers, f"temporary files left: {leftovers[:3]}"
    return counts


def batcher_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "batcher", *map(str, args)]


def run_cli(
    *args: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}
    full_env.update(env or {})
    return subprocess.run(
        batcher_cmd(*args),
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
