"""Benchmark 6, download path: batcher downloading already generated images against ``curl``.

Part A, the emulator's images (what the goal asks): a CSV of N jobs of 1024*1024 is generated
through the emulator (zero latency, no quota, pinned to its own core) by a normal
``batcher run``; then every job is reset to ``generated`` with one UPDATE through sqlite3 (hash,
size and finish time cleared) and the images deleted, which is the state a crash after the
generation calls leaves (the lead's tests build it the same way). The URLs stay valid (24 h).
Over those same URLs:

* a plain ``curl`` loop, one process per image (``while read url out; do curl ...; done``): the
  reference a user would reach for;
* one ``curl -K list`` process fetching them in turn over a kept-alive connection (context);
* ``batcher run MANIFEST --base-url URL``: it must make no API call and download every image
  (streamed, PNG-checked, hashed, fsynced, renamed, recorded).

The emulator draws small PNGs (a few KB for 1024*1024), so part A measures the per-image cost
more than bandwidth. Part B does the same with realistic files: one 1024*1024 PNG of about
1 MB (noise, so it does not compress) served from memory by :mod:`bench.static_server` (aiohttp,
pinned to the emulator's core) on 127.0.0.1 for M jobs whose rows are set to ``generated`` with
that URL (no API call is involved there).

Throughput is MB/s (10^6 bytes) of image data: batcher's over its run time after the import
(``elapsed_seconds``) and over its whole process; curl's over the whole loop.

Goal: no figure was set; read here as "batcher at least matches the curl loop".
"""

from __future__ import annotations

import argparse
import io
import os
import random
import re
import select
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import profiling
from .common import (
    PYTHON,
    BenchError,
    EmulatorProcess,
    Measured,
    batcher_command,
    batcher_run,
    child_env,
    cpu_seconds,
    pin_self,
    run_measured,
    shown,
    split_cores,
    work_dir,
)
from .manifests import cached_manifest, planned_folder
from .report import Goal, Result, bench_main, table, want_profile

CURL = "/usr/bin/curl"
TIMEOUT = 600.0


def reset_to_generated(folder: Path) -> int:
    """Every done job back to ``generated`` (its URL kept), its file and metadata removed."""
    con = sqlite3.connect(folder / "batcher.db", isolation_level=None)
    con.execute("PRAGMA busy_timeout=10000")
    n = con.execute(
        "UPDATE jobs SET state = 'generated', sha256 = NULL, bytes = NULL, finished_at = NULL, "
        "claim_token = NULL, lease_expires_at = NULL, download_attempts = 0, "
        "next_attempt_at = 0 WHERE state = 'done'"
    ).rowcount
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    shutil.rmtree(folder / "images", ignore_errors=True)
    return int(n)


def url_list(folder: Path, dest: Path) -> list[tuple[str, Path]]:
    con = sqlite3.connect(folder / "batcher.db")
    rows = con.execute(
        "SELECT image_url, id FROM jobs WHERE state = 'generated' ORDER BY rowid"
    ).fetchall()
    con.close()
    return [(url, dest / f"{job_id}.png") for url, job_id in rows]


def curl_loop(urls: list[tuple[str, Path]], work: Path, label: str) -> Measured:
    """One curl process per image, as a shell loop."""
    dest = urls[0][1].parent
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    listing = work / f"{label}.tsv"
    listing.write_text("".join(f"{u}\t{p}\n" for u, p in urls))
    script = work / f"{label}.sh"
    script.write_text(
        "set -e\n"
        "while IFS=$'\\t' read -r url out; do\n"
        f'  {CURL} -sS --fail -o "$out" "$url"\n'
        f"done < {shlex.quote(str(listing))}\n"
    )
    return run_measured(["bash", str(script)], cwd=work, timeout=TIMEOUT, logs=work / label)


def curl_config(urls: list[tuple[str, Path]], work: Path, label: str) -> Measured:
    """One curl process fetching every image in turn, connections kept alive."""
    dest = urls[0][1].parent
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    config = work / f"{label}.cfg"
    config.write_text("".join(f'url = "{u}"\noutput = "{p}"\n' for u, p in urls))
    command = [CURL, "-sS", "--fail", "-K", str(config)]
    return run_measured(command, cwd=work, timeout=TIMEOUT, logs=work / label)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.png"))


def batcher_download(manifest: Path, folder: Path, base_url: str, work: Path, label: str) -> Any:
    command = batcher_run(manifest, folder, base_url)
    measured = run_measured(command, cwd=work, timeout=TIMEOUT, logs=work / label).check()
    summary = measured.json()
    if summary["this_run"]["calls"] != 0:
        raise BenchError(f"{label}: batcher made {summary['this_run']['calls']} API calls")
    return measured, summary


def realistic_png(path: Path, target: int = 1_000_000) -> int:
    """A 1024*1024 RGB PNG of about ``target`` bytes: noise rows over a flat background."""
    from PIL import Image

    rng = random.Random(6)
    width = height = 1024
    noisy_rows = max(1, min(height, target // (width * 3)))
    raw = bytearray(b"\xe0" * (width * height * 3))
    raw[: noisy_rows * width * 3] = rng.randbytes(noisy_rows * width * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), bytes(raw)).save(buf, format="PNG", compress_level=1)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


class StaticServer:
    """``python -m bench.static_server`` on 127.0.0.1 (a free port) serving one folder."""

    def __init__(self, folder: Path, core: int | None) -> None:
        self.process = subprocess.Popen(
            [PYTHON, "-m", "bench.static_server", str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=child_env(),
        )
        if core is not None:
            os.sched_setaffinity(self.process.pid, {core})
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 20)
        line = self.process.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        if match is None:
            self.stop()
            raise BenchError(f"the static server did not start: {line!r}")
        self.root_url = match.group(0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def fake_generated(folder: Path, root_url: str) -> int:
    """Every job ``generated`` with a URL to the static file (one per job, by query)."""
    con = sqlite3.connect(folder / "batcher.db", isolation_level=None)
    con.execute("PRAGMA busy_timeout=10000")
    n = con.execute(
        "UPDATE jobs SET state = 'generated', image_url = ? || '/image.png?job=' || id, "
        "url_expires_at = ?, width = 1024, height = 1024, image_count = 1, "
        "request_id = 'bench-' || id, generated_at = ?, billed = 1, next_attempt_at = 0",
        (root_url, time.time() + 86_400, time.time()),
    ).rowcount
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return int(n)


def _row(
    name: str, mb: float, seconds: float, images: int, ref: float | None, busy: float
) -> list[Any]:
    rate = mb / seconds
    return [
        name,
        f"{rate:.2f}",
        f"{images / seconds:.0f}",
        f"{seconds:.2f}",
        "1.00x" if ref is None else f"{rate / ref:.2f}x",
        f"{busy:.0%}",
    ]


HEADERS = ["client", "MB/s", "images/s", "seconds", "vs curl loop", "server core busy"]


class Part:
    """One side-by-side comparison over one set of URLs, served by one server process."""

    def __init__(self, label: str, work: Path, server_pid: int) -> None:
        self.label = label
        self.work = work
        self.server_pid = server_pid
        self.rows: list[list[Any]] = []
        self.figures: dict[str, float] = {}

    def busy(self, run: Any) -> tuple[Any, float]:
        """Run ``run()``; its result and the server's CPU share over its wall time."""
        cpu0 = cpu_seconds(self.server_pid)
        started = time.perf_counter()
        out = run()
        return out, (cpu_seconds(self.server_pid) - cpu0) / (time.perf_counter() - started)

    def compare(self, manifest: Path, folder: Path, base_url: str, n: int, title: str) -> list[str]:
        """curl loop, curl -K and batcher over the generated jobs of ``folder``."""
        urls = url_list(folder, self.work / f"curl-{self.label}")
        loop, loop_busy = self.busy(lambda: curl_loop(urls, self.work, f"loop-{self.label}"))
        loop.check()
        image_bytes = folder_bytes(self.work / f"curl-{self.label}")
        conf, conf_busy = self.busy(lambda: curl_config(urls, self.work, f"k-{self.label}"))
        conf.check()
        (b, b_sum), b_busy = self.busy(
            lambda: batcher_download(manifest, folder, base_url, self.work, f"b-{self.label}")
        )
        saved = folder_bytes(folder / "images")
        if b_sum["done"] != n or saved != image_bytes:
            raise BenchError(f"batcher saved {b_sum['done']} of {n} images, {saved} bytes")
        # The images were checked (byte counts); drop the copies, they can be gigabytes.
        shutil.rmtree(self.work / f"curl-{self.label}", ignore_errors=True)
        mb = image_bytes / 1e6
        ref = mb / loop.wall
        span = float(b_sum["elapsed_seconds"])
        self.rows += [
            [f"**{title}, {image_bytes / n / 1e3:,.1f} KB each**"],
            _row("curl loop, one process per image", mb, loop.wall, n, None, loop_busy),
            _row("curl -K, one process, kept-alive", mb, conf.wall, n, ref, conf_busy),
            _row("batcher run (after its import)", mb, span, n, ref, b_busy),
            _row("batcher run (whole process)", mb, b.wall, n, ref, b_busy),
        ]
        self.figures.update(
            curl_loop_mb_s=ref,
            curl_k_mb_s=mb / conf.wall,
            batcher_mb_s=mb / span,
            batcher_wall_mb_s=mb / b.wall,
            batcher_cpu_s=b.cpu,
        )
        return [shown(b.command), f"bash bench/_work/{self.work.name}/loop-{self.label}.sh"]

    def profile(self, manifest: Path, folder: Path, base_url: str, n: int) -> str:
        """batcher's download of the same images again, under py-spy (GIL holder)."""
        reset_to_generated(folder)
        command = [*batcher_command("run"), str(manifest), "--out", str(folder)]
        command += ["--base-url", base_url, "--rps", "1000", "--json", "--no-progress"]
        try:
            prof = profiling.profile(
                command,
                out=self.work / f"profile-{self.label}.txt",
                cwd=self.work,
                timeout=TIMEOUT,
                mode="gil",
            )
        except BenchError as exc:
            return f"No py-spy profile: {exc}"
        return prof.markdown(f"batcher downloading the {n:,} images of part {self.label}", top=24)


def measure(quick: bool, args: argparse.Namespace) -> Result:
    n = 500 if quick else 2000
    m = 200 if quick else 1000
    work = work_dir("download")
    client_cores, server_core = split_cores()
    commands: list[str] = []
    profiles: list[str] = []

    # Part A: the emulator's images, generated through it by a normal run.
    manifest = cached_manifest(n, size="1024*1024")
    folder = work / "run"
    with EmulatorProcess(latency="0", rps="inf", core=server_core) as emu:
        pin_self(client_cores)
        gen = batcher_command("run", str(manifest), "--out", str(folder))
        gen += ["--base-url", emu.base_url, "--rps", "1000", "--json", "--no-progress"]
        run_measured(gen, cwd=work, timeout=TIMEOUT, logs=work / "generate").check()
        if reset_to_generated(folder) != n:
            raise BenchError("the generating run did not finish every job")
        a = Part("A", work, emu.pid)
        commands += a.compare(manifest, folder, emu.base_url, n, f"A: {n:,} emulator PNGs")
        a_met = a.figures["batcher_mb_s"] >= a.figures["curl_loop_mb_s"]
        if want_profile(args, a_met):
            profiles.append(a.profile(manifest, folder, emu.base_url, n))

    # Part B: realistic files from a static server; the rows are set to generated by SQL.
    static = work / "static"
    static.mkdir()
    realistic_png(static / "image.png")
    manifest_b = cached_manifest(m, size="1024*1024")
    folder_b = work / "run-b"
    planned_folder(m, folder_b, timeout=TIMEOUT, size="1024*1024")
    closed = "http://127.0.0.1:9/api/v1"  # any API call would fail: none must be made
    server = StaticServer(static, server_core)
    try:
        fake_generated(folder_b, server.root_url)
        b = Part("B", work, server.process.pid)
        title = f"B: {m:,} realistic PNGs (noise, from bench.static_server)"
        commands += b.compare(manifest_b, folder_b, closed, m, title)
        b_met = b.figures["batcher_mb_s"] >= b.figures["curl_loop_mb_s"]
        if want_profile(args, b_met):
            profiles.append(b.profile(manifest_b, folder_b, closed, m))
    finally:
        server.stop()
    shutil.rmtree(folder_b / "images", ignore_errors=True)  # a gigabyte of copies of one file

    rows = a.rows + b.rows
    for r in rows:
        r += [""] * (len(HEADERS) - len(r))
    goals = [
        Goal(
            text=f"A ({n:,} emulator images): batcher >= the curl loop",
            met=a_met,
            measured=f"{a.figures['batcher_mb_s'] / a.figures['curl_loop_mb_s']:.2f}x "
            f"({a.figures['batcher_wall_mb_s'] / a.figures['curl_loop_mb_s']:.2f}x over its "
            "whole process)",
        ),
        Goal(
            text=f"B ({m:,} realistic images): batcher >= the curl loop",
            met=b_met,
            measured=f"{b.figures['batcher_mb_s'] / b.figures['curl_loop_mb_s']:.2f}x "
            f"({b.figures['batcher_wall_mb_s'] / b.figures['curl_loop_mb_s']:.2f}x over its "
            "whole process)",
        ),
    ]
    return Result(
        name="download",
        title="6. Download path",
        quick=quick,
        sizes=f"A: {n:,} emulator images, B: {m:,} realistic images, all 1024*1024",
        table=table(HEADERS, rows),
        goals=goals,
        commands=commands,
        figures={"a": a.figures, "b": b.figures},
        profiles=profiles,
        notes=[
            "In B batcher's --base-url points at a closed port: any API call would fail the "
            "run; the summary shows none was made.",
            "'server core busy': the serving process's CPU over the client's wall time; near "
            "100% means the server, not the client, set the pace.",
        ],
    )


def main() -> int:
    return bench_main("download", __doc__, measure)


if __name__ == "__main__":
    sys.exit(main())
