"""Thumbnails for the report: about 320 px JPEGs made with Pillow, named by the image's sha256.

A thumbnail is made once: its name is the hash of the image it shows, so the next report (or
the review server) finds it and skips the image, and an image redone (a new hash) gets a new
one. Many missing thumbnails are made by a pool of processes, one per core; the files are
written to a temporary name and renamed, so an interrupted build never leaves a broken one.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["THUMB_PX", "ThumbJob", "existing_thumbs", "make_thumbs", "thumb_name"]

THUMB_PX = 320
_QUALITY = 80
_PER_PROCESS = 64  # images per task handed to a worker process
_IN_PROCESS = 256  # fewer than this are made here: starting worker processes costs more


@dataclass(frozen=True, slots=True)
class ThumbJob:
    """Make ``dest`` from the image at ``source``."""

    source: Path
    dest: Path


def thumb_name(sha256: str) -> str:
    """The thumbnail's path under ``thumbs/`` for an image with this hash.

    >>> thumb_name("ab" * 32)
    'ab/abababababababababababababababababababababababababababababababab.jpg'
    """
    return f"{sha256[:2]}/{sha256}.jpg"


def existing_thumbs(folder: Path) -> set[str]:
    """Every thumbnail already under ``folder`` (names as :func:`thumb_name` gives them)."""
    found: set[str] = set()
    if not folder.is_dir():
        return found
    with os.scandir(folder) as top:
        for sub in top:
            if sub.is_dir(follow_symlinks=False) and len(sub.name) == 2:
                with os.scandir(sub.path) as inner:
                    found.update(f"{sub.name}/{e.name}" for e in inner if e.name.endswith(".jpg"))
    return found


def _one(job: ThumbJob) -> bool:
    """Make one thumbnail; False when the image cannot be read (missing or not an image)."""
    from PIL import Image, UnidentifiedImageError  # here: the CLI starts without Pillow

    try:
        with Image.open(job.source) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False
    factor = min(rgb.size) // THUMB_PX
    if factor > 1:  # a box filter first (cheap), then a good filter on the small image
        rgb = rgb.reduce(factor)
    rgb.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    job.dest.parent.mkdir(parents=True, exist_ok=True)
    temp = job.dest.with_name(f".{job.dest.name}.{os.getpid()}.part")
    try:
        rgb.save(temp, "JPEG", quality=_QUALITY, optimize=False)
        os.replace(temp, job.dest)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
    return True


def _many(jobs: Sequence[ThumbJob]) -> int:
    return sum(_one(j) for j in jobs)


def make_thumbs(
    jobs: Iterable[ThumbJob], *, processes: int | None = None, deadline: float | None = None
) -> int:
    """Make every thumbnail of ``jobs``; returns how many were made.

    ``processes``: worker processes (default: one per core; 1 makes them here). ``deadline``:
    a ``time.monotonic()`` after which no new batch is started (the rest are left for the next
    report; the page shows the full image meanwhile).
    """
    todo = list(jobs)
    if not todo or (deadline is not None and time.monotonic() > deadline):
        return 0
    workers = processes or len(os.sched_getaffinity(0)) or 1
    if workers == 1 or len(todo) <= _IN_PROCESS:
        made = 0
        for job in todo:
            if deadline is not None and time.monotonic() > deadline:
                break
            made += _one(job)
        return made
    batches = [todo[i : i + _PER_PROCESS] for i in range(0, len(todo), _PER_PROCESS)]
    made = 0
    # forkserver: the caller has threads (the database's), which a fork would copy half-held
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: set[concurrent.futures.Future[int]] = set()
        for batch in batches:
            if deadline is not None and time.monotonic() > deadline:
                break
            if len(pending) >= 2 * workers:
                finished, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED
                )
                made += sum(f.result() for f in finished)
            pending.add(pool.submit(_many, batch))
        made += sum(f.result() for f in concurrent.futures.as_completed(pending))
    return made
