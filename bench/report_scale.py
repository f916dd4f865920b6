"""The run report at scale: a 20,000-job report built with its thumbnails, rebuilt after 100
new images, and its first page in Chromium; beside it, a few hundred photograph-like images.

Goals: the build (``batcher report DIR``, thumbnails included) <= 30 s on 2 cores; a rebuild
after 100 new images <= 3 s; the first page usable (data loaded, first tiles' thumbnails
shown) within 2 s.

The run folder is fabricated (``bench.runfolder``): jobs imported through the JobStore, the
emulator's own pictures as images (1024*1024 by default), results filled in as a run writes
them. Baselines measured in the same run:

* thumbnails: the report's own scaling (``batcher.gallery.thumbs.scaled``: decode, sample,
  reduce) and JPEG encode of every image in a bare process pool of as many processes as cores,
  so the ratio is what the report adds on top; the same for the photograph-like images (RGB
  PNGs of ~1.4 MB, as a real model returns them), whose decoding outweighs everything else;
* the first page: the same report of 100 jobs, so the ratio is what 20,000 jobs cost the page.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import PYTHON, BenchError, child_env, core_count, work_dir
from .report import Goal, Result, bench_main, table
from .runfolder import add_done_images, fabricate_run

CHROMIUM = Path("/usr/bin/chromium")


def _floor_one(path: str) -> int:
    from PIL import Image

    from batcher.gallery.thumbs import scaled

    with Image.open(path) as im:
        im.load()
        thumb = scaled(im)
    thumb.save(os.devnull, "JPEG", quality=80)
    return 1


def thumbnail_floor(images: list[Path]) -> float:
    """Seconds for a bare process pool to thumbnail ``images`` (nothing else)."""
    started = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(core_count()) as pool:
        done = sum(pool.map(_floor_one, [str(p) for p in images], chunksize=64))
    assert done == len(images)
    return time.perf_counter() - started


def timed_report(folder: Path) -> float:
    """Wall-clock seconds of the real CLI writing the report."""
    started = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-m", "batcher", "report", str(folder)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"batcher report failed: {proc.stderr.strip()[-500:]}")
    return time.perf_counter() - started


def first_page_seconds(index: Path, repeats: int = 3) -> tuple[float, int]:
    """Best of ``repeats``: seconds from navigation until the page is ready and the first
    tiles' thumbnails are decoded; and how many tiles the page holds."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BenchError("Playwright for Python is not installed") from exc
    if not CHROMIUM.is_file():
        raise BenchError(f"no Chromium at {CHROMIUM}")
    args = ["--no-sandbox", "--headless=new", "--disable-gpu", "--no-first-run"]
    best, tiles = float("inf"), 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            for _ in range(repeats):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                started = time.perf_counter()
                page.goto(index.as_uri())
                page.wait_for_selector("body[data-ready='1']", timeout=60_000)
                page.wait_for_function(
                    "[...document.querySelectorAll('#grid .tile img')].slice(0, 12)"
                    ".every(i => i.complete && i.naturalWidth > 0)",
                    timeout=60_000,
                )
                best = min(best, time.perf_counter() - started)
                tiles = len(page.query_selector_all("#grid .tile"))
                page.close()
        finally:
            browser.close()
    return best, tiles


def body(quick: bool, args: Any) -> Result:
    jobs = args.jobs or (5_000 if quick else 20_000)
    photos = args.photos if args.photos is not None else (100 if quick else 300)
    work = work_dir("report_scale")
    folder = work / "run"
    t0 = time.perf_counter()
    fabricate_run(folder, jobs=jobs + 100, done=jobs, size=args.size)
    made = time.perf_counter() - t0
    print(f"fabricated {jobs:,} done jobs (+100 pending) at {args.size}px in {made:.1f}s")
    images = sorted((folder / "images").rglob("*.png"))
    floor = thumbnail_floor(images)
    print(f"baseline: bare thumbnail pool, {len(images):,} images: {floor:.1f}s")
    build = timed_report(folder)
    print(f"batcher report, first build: {build:.1f}s")
    again = timed_report(folder)
    print(f"batcher report, nothing new: {again:.1f}s")
    add_done_images(folder, range(jobs, jobs + 100), size=args.size)
    rebuild = timed_report(folder)
    print(f"batcher report, after 100 new images: {rebuild:.1f}s")
    small = work / "small"
    fabricate_run(small, jobs=100, done=100, size=args.size)
    timed_report(small)
    page_small, _ = first_page_seconds(small / "report" / "index.html")
    page_big, tiles = first_page_seconds(folder / "report" / "index.html")
    print(f"first page: {page_big:.2f}s with {jobs + 100:,} jobs, {page_small:.2f}s with 100")
    data = sum(p.stat().st_size for p in (folder / "report" / "data").glob("*.js"))
    shutil.rmtree(small)
    rows = [
        ["bare thumbnail pool (baseline)", f"{floor:.1f} s", "1.00"],
        ["batcher report, first build", f"{build:.1f} s", f"{build / floor:.2f}"],
        ["batcher report, nothing new", f"{again:.1f} s", f"{again / floor:.2f}"],
        ["batcher report, 100 new images", f"{rebuild:.1f} s", f"{rebuild / floor:.2f}"],
        ["first page, 100 jobs (baseline)", f"{page_small:.2f} s", "1.00"],
        [f"first page, {jobs + 100:,} jobs", f"{page_big:.2f} s", f"{page_big / page_small:.2f}"],
    ]
    figures = {"build": build, "rebuild": rebuild, "first_page": page_big, "floor": floor}
    if photos:
        shots = work / "photos"
        fabricate_run(shots, jobs=photos, done=photos, size=args.size, photos=True)
        pictures = sorted((shots / "images").rglob("*.png"))
        each = sum(p.stat().st_size for p in pictures) / len(pictures) / 1e6
        photo_floor = thumbnail_floor(pictures)
        photo_build = timed_report(shots)
        print(
            f"{photos:,} photograph-like images ({each:.1f} MB): bare pool {photo_floor:.1f}s, "
            f"batcher report {photo_build:.1f}s"
        )
        rows += [
            [f"bare thumbnail pool, {photos:,} photographs (baseline)", f"{photo_floor:.1f} s",
             "1.00"],
            [f"batcher report, {photos:,} photographs, first build", f"{photo_build:.1f} s",
             f"{photo_build / photo_floor:.2f}"],
        ]  # fmt: skip
        figures |= {"photo_floor": photo_floor, "photo_build": photo_build, "photo_mb": each}
        shutil.rmtree(shots)
    goals = [
        Goal(text="first build <= 30 s", met=build <= 30, measured=f"{build:.1f} s"),
        Goal(text="rebuild after 100 images <= 3 s", met=rebuild <= 3, measured=f"{rebuild:.1f} s"),
        Goal(text="first page usable <= 2 s", met=page_big <= 2, measured=f"{page_big:.2f} s"),
        Goal(text="at most a few hundred tiles in the page", met=tiles <= 300, measured=str(tiles)),
    ]
    sizes = f"{jobs:,} done jobs, {args.size}*{args.size} emulator pictures"
    if photos:
        sizes += f"; {photos:,} photograph-like RGB PNGs of {args.size}*{args.size}"
    return Result(
        name="report_scale",
        title="Report at scale",
        quick=quick,
        sizes=sizes,
        table=table(["what", "time", "ratio to its baseline"], rows),
        goals=goals,
        notes=[
            f"report data: {data / 1e6:.1f} MB of script files for {jobs + 100:,} jobs",
            "thumbnails are made by one process per core; the baseline pays the same Pillow "
            "calls, so the first build's ratio is the report's own overhead",
        ],
        commands=[
            f"python -m bench.report_scale --size {args.size}" + (" --quick" if quick else "")
        ],
        figures=figures,
    )


def add_args(parser: Any) -> None:
    parser.add_argument("--jobs", type=int, help="done jobs (default 20,000; 5,000 with --quick)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument(
        "--photos", type=int, help="photograph-like images (default 300; 100 with --quick; 0: none)"
    )


def main() -> int:
    return bench_main("report_scale", __doc__, body, add_args)


if __name__ == "__main__":
    sys.exit(main())
