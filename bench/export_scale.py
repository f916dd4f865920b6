"""Benchmark: ``batcher export`` of a big run folder, in flat memory and near ``tar``'s speed.

The run folders are made by :mod:`bench.dataset_fixture` (jobs moved to ``done`` through the
job store, one real PNG each, half under ``train/`` and half under ``test/``, two manifest
variables), not by generating the images through the service.

- Memory: peak RSS (``ru_maxrss`` of the export process alone, from ``wait4``) of
  ``batcher export DIR --format parquet`` and ``--format webdataset`` over 100,000 images.
  Goal: under 300 MB each.
- Speed: ``batcher export DIR --format webdataset -o OUT`` against
  ``tar cf OUT.tar -C DIR/images .`` over the same files, wall time of the whole command
  (batcher's start-up included). Both are run once first (the files in the page cache for
  both), then in alternating order, best of N each, after a ``sync`` (so neither pays for
  writing back what the one before left dirty; batcher's one fsync per shard is counted).
  Told beside the goal, not instead of it: tar followed by ``sync FILE`` (an fsync of its
  archive), whose data is then on disk as batcher's shards are, which separates the cost of
  that fsync (the disk's, for large images) from batcher's own.
  Also told beside it: the same export with its row loop in Python (``BATCHER_PURE_PYTHON=1``,
  what an install without a C compiler runs), the C loop's gain measured in the same run.
  Goal: batcher at >= 0.8x tar's speed (tar's time / batcher's time) over 20,000 images,
  judged on realistic images. Three sizes:

  * 20,000 tiny images (16 x 16, about 1 kB): the per-file cost alone;
  * 20,000 of the emulator's images (its own drawing at 1328 x 1328, about 10 kB, as a
    rehearsal run writes them);
  * 2,000 photograph-like images (400 x 400 random pixels stored uncompressed, about 480 kB:
    a photo's PNG does not deflate), where reading and writing the bytes decides.

  The start-up alone (an export of no job) is measured beside them, and the rate of the
  export once started.

Batcher's and the repository's bytecode is compiled first (as an installed package has it), so
a ``PYTHONDONTWRITEBYTECODE`` environment does not charge compiling to every start.

``--quick`` uses 5,000 images (500 photographs) and 20,000 for memory, best of 3 (else 5).
"""

from __future__ import annotations

import compileall
import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .common import Measured, batcher_command, child_env, run_measured, shown, work_dir
from .dataset_fixture import fabricate
from .report import Goal, Result, bench_main, fmt, table

MEMORY_GOAL_MB = 300.0
SPEED_GOAL = 0.8
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    """One image size of the speed comparison."""

    label: str
    count: int
    side: int
    kind: str  # "flat" (tiny), "emulator", "noise" (photograph-like)


@dataclass(frozen=True, kw_only=True, slots=True)
class Speed:
    case: Case
    tar: float
    export: float
    tar_cpu: float
    export_cpu: float
    megabytes: float
    tar_synced: float  # tar, then its archive fsynced (``sync FILE``): its data on disk
    python_loop: float  # the export with its row loop in Python (BATCHER_PURE_PYTHON=1)

    @property
    def synced_ratio(self) -> float:
        """Against tar whose archive is on disk when it ends, as batcher's shards are."""
        return self.tar_synced / self.export

    @property
    def ratio(self) -> float:
        return self.tar / self.export


def _fixture(n: int, *, side: int = 16, kind: str = "flat") -> Path:
    """A run folder of ``n`` done images, made once and kept in bench/_work."""
    name = f"export_fixture_{n}" if kind == "flat" else f"export_fixture_{n}_{kind}_{side}px"
    root = work_dir(name, fresh=False)
    marker = root / "complete"
    if not marker.is_file():
        shutil.rmtree(root)
        root.mkdir(parents=True)
        make = functools.partial(
            fabricate,
            root / "run",
            n,
            side=side,
            noise=kind == "noise",
            emulator=kind == "emulator",
        )
        anyio.run(make)
        marker.write_text(str(n))
    return root / "run"


def _export(
    run: Path, out: Path, fmt_name: str, logs: Path, *, python_loop: bool = False
) -> Measured:
    if out.exists():
        shutil.rmtree(out)
    command = batcher_command("export", str(run), "--format", fmt_name, "-o", str(out))
    env = child_env(BATCHER_PURE_PYTHON="1") if python_loop else None
    return run_measured(command, cwd=run.parent, timeout=900, logs=logs, env=env).check()


def _tar(run: Path, out: Path, logs: Path) -> Measured:
    out.unlink(missing_ok=True)
    command = ["tar", "cf", str(out), "-C", str(run / "images"), "."]
    return run_measured(command, cwd=run.parent, timeout=900, logs=logs).check()


def _tar_synced(run: Path, out: Path, logs: Path) -> Measured:
    """tar, then ``sync FILE`` (an fsync of the archive): batcher fsyncs each shard before
    renaming it, so that a power cut never leaves a shard under its final name with data
    missing; plain tar leaves its archive in the page cache. Told beside the goal, which
    is against plain tar."""
    out.unlink(missing_ok=True)
    script = 'tar cf "$1" -C "$2" . && sync "$1"'
    command = ["sh", "-c", script, "sh", str(out), str(run / "images")]
    return run_measured(command, cwd=run.parent, timeout=900, logs=logs).check()


def _startup(run: Path, logs: Path, fmt_name: str) -> Measured:
    """``batcher export`` of nothing (``--state failed``: no failed job): the start-up alone,
    of the WebDataset export measured against tar (a folder of no shard and the card), or of
    a JSONL one (the general path: the job store, SQLAlchemy, an event loop)."""
    out = str(logs) + (".jsonl" if fmt_name == "jsonl" else ".wds")
    command = batcher_command(
        "export", str(run), "--format", fmt_name, "--state", "failed", "-o", out
    )
    return run_measured(command, cwd=run.parent, timeout=300, logs=logs).check()


def _speed(case: Case, work: Path, repeats: int, commands: list[str]) -> Speed:
    """tar and the export over ``case``'s folder: one warm-up each, then ``repeats`` rounds in
    alternating order; the best wall time of each (and the CPU of that run)."""
    run = _fixture(case.count, side=case.side, kind=case.kind)
    tar_out, wds_out = work / f"{case.kind}.tar", work / f"wds-{case.kind}"
    _tar(run, tar_out, work / f"tar-{case.kind}-warm")
    _export(run, wds_out, "webdataset", work / f"wds-{case.kind}-warm")
    best: dict[str, Measured] = {}
    for i in range(repeats):
        order = ("tar", "export", "synced", "python")
        for what in order if i % 2 == 0 else reversed(order):
            logs = work / f"{what}-{case.kind}-{i}"
            os.sync()  # no dirty pages of the previous command written back during this one
            if what == "tar":
                m = _tar(run, tar_out, logs)
            elif what == "synced":
                m = _tar_synced(run, tar_out, logs)
            elif what == "python":
                m = _export(run, wds_out, "webdataset", logs, python_loop=True)
            else:
                m = _export(run, wds_out, "webdataset", logs)
            if what not in best or m.wall < best[what].wall:
                best[what] = m
    commands += [shown(best["tar"].command), shown(best["export"].command)]
    megabytes = sum(p.stat().st_size for p in (run / "images").rglob("*.png")) / 1e6
    tar_out.unlink(missing_ok=True)
    shutil.rmtree(wds_out, ignore_errors=True)
    return Speed(
        case=case,
        tar=best["tar"].wall,
        export=best["export"].wall,
        tar_cpu=best["tar"].cpu,
        export_cpu=best["export"].cpu,
        megabytes=megabytes,
        tar_synced=best["synced"].wall,
        python_loop=best["python"].wall,
    )


def body(quick: bool, args: Any) -> Result:
    speed_n, memory_n, photos_n = (5_000, 20_000, 500) if quick else (20_000, 100_000, 2_000)
    repeats = 3 if quick else 5
    for package in ("batcher", "jobs"):
        compileall.compile_dir(ROOT / package, quiet=1)
    work = work_dir("export_scale")
    rows: list[list[Any]] = []
    commands: list[str] = []

    big = _fixture(memory_n)
    peaks: dict[str, float] = {}
    for kind in ("parquet", "webdataset"):
        m = _export(big, work / f"mem-{kind}", kind, work / f"mem-{kind}")
        peaks[kind] = m.maxrss_mb
        commands.append(shown(m.command))
        rows.append([f"export {memory_n:,} images, {kind}", fmt(m.wall), "-", fmt(m.maxrss_mb, 0)])
    shutil.rmtree(work / "mem-parquet", ignore_errors=True)
    shutil.rmtree(work / "mem-webdataset", ignore_errors=True)

    cases = [
        Case(label="tiny (16 x 16)", count=speed_n, side=16, kind="flat"),
        Case(label="emulator's (1328 x 1328)", count=speed_n, side=1328, kind="emulator"),
        Case(label="photograph-like (400 x 400 noise)", count=photos_n, side=400, kind="noise"),
    ]
    speeds = [_speed(case, work, repeats, commands) for case in cases]
    small = _fixture(speed_n)
    start = min(_startup(small, work / f"start-{i}", "webdataset").wall for i in range(repeats))
    general = min(_startup(small, work / f"start-jsonl-{i}", "jsonl").wall for i in range(repeats))
    for sp in speeds:
        each = sp.megabytes / sp.case.count * 1000
        what = f"{sp.case.count:,} {sp.case.label} images, {each:,.1f} kB each"
        rows.append([f"tar cf over {what}", fmt(sp.tar, 3), fmt(sp.tar_cpu, 3), "-"])
        rows.append([f"tar cf + sync of the archive, {what}", fmt(sp.tar_synced, 3), "-", "-"])
        rows.append([f"export webdataset of {what}", fmt(sp.export, 3), fmt(sp.export_cpu, 3), "-"])
        rows.append([f"the same, its row loop in Python, {what}", fmt(sp.python_loop, 3), "-", "-"])
    rows.append(["batcher export start-up alone (webdataset, no job)", fmt(start, 3), "-", "-"])
    rows.append(["batcher export start-up alone (jsonl, no job)", fmt(general, 3), "-", "-"])

    def said(sp: Speed) -> str:
        rate = sp.case.count / max(sp.export - start, 1e-9)
        return (
            f"{sp.case.label}, {sp.case.count:,} x {sp.megabytes / sp.case.count * 1000:,.1f} kB: "
            f"{sp.ratio:.2f}x (tar {sp.tar:.3f} s, batcher {sp.export:.3f} s, "
            f"{rate:,.0f} images/s after start-up; {sp.synced_ratio:.2f}x tar with its archive "
            f"fsynced, {sp.tar_synced:.3f} s; the row loop in Python {sp.python_loop:.3f} s, "
            f"{sp.tar / sp.python_loop:.2f}x)"
        )

    worst = max(peaks.values())
    realistic = speeds[1:]
    goals = [
        Goal(
            text=f"peak RSS exporting {memory_n:,} images < {MEMORY_GOAL_MB:.0f} MB",
            met=worst < MEMORY_GOAL_MB,
            measured=", ".join(f"{k} {v:.0f} MB" for k, v in peaks.items()),
        ),
    ]
    goals += [
        Goal(
            text=f"WebDataset export >= {SPEED_GOAL}x tar's speed, {sp.case.label} images",
            met=sp.ratio >= SPEED_GOAL,
            measured=said(sp),
        )
        for sp in speeds
    ]
    print(f"memory: peak RSS {worst:.0f} MB against a goal of {MEMORY_GOAL_MB:.0f} MB")
    for sp in speeds:
        print(f"speed: {said(sp)} (goal {SPEED_GOAL})")
    print(f"start-up alone: {start:.3f} s (webdataset), {general:.3f} s (jsonl)")
    return Result(
        name="export_scale",
        title="Export: flat memory at 100,000 images, WebDataset speed against tar",
        quick=quick,
        sizes=(
            f"{memory_n:,} images for memory; {speed_n:,} tiny, {speed_n:,} emulator's and "
            f"{photos_n:,} photograph-like for speed, best of {repeats}"
        ),
        table=table(["what", "wall s", "CPU s", "peak RSS MB"], rows),
        goals=goals,
        notes=[
            "tar spends a few microseconds of C per file; batcher also starts Python "
            f"({start:.2f} s for an export of nothing), reads each job's row, builds its JSON "
            "record and writes three members (png, json, txt) per image, in C where "
            "batcher._speedups is built (else in Python: BATCHER_PURE_PYTHON=1, measured beside "
            "it), the two splits in two processes when a second core is free. With "
            "tiny images the ratio measures that fixed and per-file cost; the goal is judged "
            "on the realistic sizes (" + ", ".join(f"{sp.ratio:.2f}x" for sp in realistic) + ").",
        ],
        commands=commands,
        figures={
            "peaks_mb": peaks,
            "startup_s": start,
            "startup_jsonl_s": general,
            "speed_ratio": speeds[0].ratio,
            "emulator_speed_ratio": speeds[1].ratio,
            "photo_speed_ratio": speeds[2].ratio,
            "speeds": {
                sp.case.kind: {
                    "tar_s": sp.tar,
                    "export_s": sp.export,
                    "ratio": sp.ratio,
                    "python_loop_s": sp.python_loop,
                }
                for sp in speeds
            },
        },
    )


def main() -> int:
    return bench_main("export_scale", __doc__, body)


if __name__ == "__main__":
    raise SystemExit(main())
