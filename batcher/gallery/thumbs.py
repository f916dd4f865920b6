"""Thumbnails for the report: about 320 px JPEGs made with Pillow, named by the image's sha256.

A thumbnail is made once: its name is the hash of the image it shows, so the next report (or
the review server) finds it and skips the image, and an image redone (a new hash) gets a new
one. Many missing thumbnails are made by a pool of processes, one per core; the files are
written to a temporary name and renamed, so an interrupted build never leaves a broken one.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["THUMB_PX", "ThumbJob", "existing_thumbs", "fit", "make_thumbs", "scaled", "thumb_name"]

THUMB_PX = 320
_QUALITY = 80
_PER_PROCESS = 64  # images per task handed to a worker process
_IN_PROCESS = 256  # fewer than this are made here: starting worker processes costs more
_KEEP_BYTES = 32 << 20  # what a worker process's C heap keeps between images (see _worker_start)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


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


def fit(width: int, height: int) -> tuple[int, int]:
    """The thumbnail's size for an image of this size: within ``THUMB_PX`` square, the
    image's proportions kept (as ``Image.thumbnail`` rounds them); a smaller image keeps its own.

    >>> fit(1328, 1328), fit(1024, 512), fit(400, 1600), fit(200, 100)
    ((320, 320), (320, 160), (80, 320), (200, 100))
    """
    if width <= THUMB_PX and height <= THUMB_PX:
        return width, height
    if width >= height:
        return THUMB_PX, max(1, round(height * THUMB_PX / width))
    return max(1, round(width * THUMB_PX / height)), THUMB_PX


def _to_8bit(im: Any) -> Any:
    """16-bit and float greyscale scaled to 0..255 (``convert`` would clip them: a 16-bit
    image turned white wherever it was above 255)."""
    if im.mode.startswith("I;16"):  # any byte order: as 32-bit integers first
        wide = im if im.mode == "I;16" else im.convert("I")
        return wide.point(lambda v: v * (1 / 257)).convert("L")
    if im.mode in ("I", "F"):
        top = im.getextrema()[1] or 0
        scale = 255.0 if im.mode == "F" and top <= 1.0 else 1 / 257 if top > 255 else 1.0
        return im.point(lambda v: v * scale).convert("L")
    return im


def scaled(im: Any) -> Any:
    """The thumbnail of a loaded Pillow image: an ``RGB`` (or ``L``) image of :func:`fit`'s
    size, transparent parts on white (it is stored as a JPEG).

    Why each step: a palette image (what the emulator writes, a megapixel or more) is first
    sampled (nearest pixel) down to a whole multiple of the thumbnail, two or more, keeping
    about every other row and column: cheap in palette mode, and converting that to RGB costs
    a quarter to two fifths of converting the whole image, which was the largest single cost
    (then a Lanczos pass on a size just off the thumbnail's). A box filter (``reduce``) then
    averages the multiple down exactly, so edges stay smooth. Other images are box-reduced by
    the whole factor and finished with Lanczos; a transparent image is reduced with its alpha
    (Pillow premultiplies it) and laid on white last, when it is small."""
    from PIL import Image

    im = _to_8bit(im)
    target = fit(*im.size)
    clear = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if im.mode == "P":
        k = round(min(im.width / target[0], im.height / target[1]) / 2)
        if k >= 2:  # sampled: every other pixel or so, never fewer
            im = im.resize((k * target[0], k * target[1]), Image.Resampling.NEAREST)
    if clear:
        im = im.convert("RGBA")
    elif im.mode not in ("RGB", "L"):
        im = im.convert("L" if im.mode == "1" else "RGB")
    factor = min(im.width // target[0], im.height // target[1])
    if factor > 1 and im.size == (factor * target[0], factor * target[1]):
        im = im.reduce(factor)  # an exact multiple: the box filter alone
    elif im.size != target:  # the box filter by the whole factor, then Lanczos
        im = im.resize(target, Image.Resampling.LANCZOS, reducing_gap=1.0)
    if clear:
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        im = flat
    return im


def _one(job: ThumbJob) -> bool:
    """Make one thumbnail; False when the image cannot be read (missing or not an image)."""
    from PIL import Image, UnidentifiedImageError  # here: the CLI starts without Pillow

    try:
        with Image.open(job.source) as im:
            if im.format == "JPEG":  # decoded at 1/2, 1/4 or 1/8 while 1.5 times the size
                width, height = fit(*im.size)
                im.draft(None, (width * 3 // 2, height * 3 // 2))
            im.load()
            thumb = scaled(im)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False
    job.dest.parent.mkdir(parents=True, exist_ok=True)
    temp = job.dest.with_name(f".{job.dest.name}.{os.getpid()}.part")
    try:
        thumb.save(temp, "JPEG", quality=_QUALITY, optimize=False)
        os.replace(temp, job.dest)
    except OSError:
        temp.unlink(missing_ok=True)
        raise
    return True


def _many(jobs: Sequence[ThumbJob]) -> int:
    return sum(_one(j) for j in jobs)


def _worker_start() -> None:
    """Set up a thumbnail worker process to keep its memory from one image to the next.

    An emulator picture of 1280*1280 and its sampled RGB copy are megabytes each. Freed after
    every image, they let glibc hand the top of the heap back to the kernel (``brk``) and take
    it again for the next image, each time faulting in zeroed pages: two thirds of the
    workers' CPU went to the kernel at that size (measured: 43 s against 26 s for 20,000
    pictures). Pillow keeps freed blocks for reuse, and glibc keeps up to ``_KEEP_BYTES`` of
    free heap instead of trimming it. Elsewhere than glibc it is only slower."""
    from PIL import Image

    # what PILLOW_BLOCKS_MAX sets when Pillow is imported (this process may have it already)
    Image.core.set_blocks_max(32)  # type: ignore[attr-defined]
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    mallopt(_M_TOP_PAD, _KEEP_BYTES // 4)
    mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)


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
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_start
    ) as pool:
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
