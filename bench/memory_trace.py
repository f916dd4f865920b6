"""The memory profile: what batcher holds, and what grows with the number of jobs.

Peak RSS alone does not say what to fix. This runs the real ``batcher run`` CLI in-process
(its ``main``) under ``tracemalloc`` against a pinned emulator (zero latency, no quota) and
takes snapshots at three points:

* *manifest read*: the moment the import has read the manifest to its end (the duplicate
  detection's hash sets are at their largest);
* *run start*: the import done, the runner about to start;
* *run end*: every job done, before ``metadata.jsonl`` is written.

For each it prints the RSS (from /proc), the memory Python has allocated (traced), and the
biggest allocation sites; for *run end* also what grew since *run start*. Allocations outside
Python's allocator (SQLite's page cache, for one) show only in the RSS.

Run: ``python -m bench.memory_trace [--jobs 10000]``. tracemalloc makes the run about twice
as slow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _child(argv: list[str], out: Path) -> int:
    import tracemalloc

    from batcher import cli, pool
    from jobs import manifest

    tracemalloc.start(1)
    points: dict[str, Any] = {}
    snapshots: dict[str, tracemalloc.Snapshot] = {}

    def take(name: str) -> None:
        current, peak = tracemalloc.get_traced_memory()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        snapshots[name] = snapshot
        top = snapshot.statistics("lineno")[:10]
        points[name] = {
            "rss_mb": _rss_mb(),
            "traced_mb": current / 1e6,
            "traced_peak_mb": peak / 1e6,
            "top": [(str(s.traceback[0]), s.size / 1e6, s.count) for s in top],
        }
        tracemalloc.reset_peak()

    original_iter = manifest.Manifest.__iter__

    def iterate(self: Any) -> Any:
        yield from original_iter(self)
        take("manifest read")

    manifest.Manifest.__iter__ = iterate  # type: ignore[method-assign]

    original_run = pool.Runner.run

    async def run(self: Any) -> Any:
        take("run start")
        result = await original_run(self)
        take("run end")
        return result

    pool.Runner.run = run  # type: ignore[method-assign]
    try:
        return cli.main(argv)
    finally:
        if "run start" in snapshots and "run end" in snapshots:
            diff = snapshots["run end"].compare_to(snapshots["run start"], "lineno")[:10]
            points["run end"]["growth"] = [
                (str(d.traceback[0]), d.size_diff / 1e6, d.count_diff) for d in diff
            ]
        out.write_text(json.dumps(points))


def trace_run(jobs: int) -> dict[str, Any]:
    from .common import PYTHON, ROOT, EmulatorProcess, pin_self, run_measured, split_cores, work_dir
    from .manifests import cached_manifest

    work = work_dir("memory_trace")
    out = work / "points.json"
    client_cores, server_core = split_cores()
    extra = ["--max-images", str(jobs + 1000)]
    with EmulatorProcess(latency="0", rps="inf", core=server_core, extra=extra) as emu:
        pin_self(client_cores)
        command = [PYTHON, "-m", "bench.memory_trace", "--child", str(out), "run"]
        command += [str(cached_manifest(jobs)), "--out", str(work / "run")]
        command += ["--base-url", emu.base_url, "--rps", "1000", "--json", "--no-progress"]
        run_measured(command, cwd=ROOT, timeout=120 + jobs / 20, logs=work / "run.log").check()
    points: dict[str, Any] = json.loads(out.read_text())
    return points


def _short(where: str) -> str:
    from .common import ROOT

    where = where.replace(str(ROOT) + "/", "")
    if "site-packages/" in where:
        where = where.split("site-packages/", 1)[1]
    return where


def describe(points: dict[str, Any], jobs: int, top: int = 6) -> list[str]:
    lines = [
        f"tracemalloc over a {jobs:,}-job run (`python -m bench.memory_trace --jobs {jobs}`):",
        "",
        "| point | RSS MB | traced MB | traced peak since the last point MB |",
        "|---|---|---|---|",
    ]
    for name, p in points.items():
        lines.append(
            f"| {name} | {p['rss_mb']:.1f} | {p['traced_mb']:.1f} | {p['traced_peak_mb']:.1f} |"
        )
    for name, p in points.items():
        lines += ["", f"Biggest allocation sites at *{name}*:", "", "| MB | blocks | where |"]
        lines.append("|---|---|---|")
        lines += [f"| {mb:.2f} | {n:,} | `{_short(w)}` |" for w, mb, n in p["top"][:top]]
        if "growth" in p:
            lines += ["", "Growth from *run start* to *run end*:", "", "| MB | blocks | where |"]
            lines.append("|---|---|---|")
            lines += [f"| {mb:+.2f} | {n:+,} | `{_short(w)}` |" for w, mb, n in p["growth"][:top]]
    return lines


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return _child(sys.argv[3:], Path(sys.argv[2]))
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_trace", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    print("\n".join(describe(trace_run(args.jobs), args.jobs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
