"""A run folder made quickly, for the report's benchmark and its browser tests.

The jobs are imported through the real ``JobStore``; the results a run would have written
(request id, hash, size, cost, latency, times) are then filled in with one SQL statement,
and the images are the emulator's own pictures (``render_png``), a few dozen drawn and each
job's file made unique by a text chunk, so thumbnails cost what they cost for a real run's
emulated images while 20,000 of them are written in seconds. With ``photos``, the pictures
are photograph-like RGB PNGs instead (:func:`photo_png`), as a real model returns them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import random
import sqlite3
import struct
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio

from batcher.emulator.images import render_png
from jobs import JobSpec, JobStore

__all__ = ["add_done_images", "fabricate_run", "in_thread", "photo_png"]

T = TypeVar("T")
T0 = 1_750_000_000.0
_BASES = 24  # distinct pictures drawn; every file still differs (a tEXt chunk)
FOLDERS = ("shoes", "bags", "lamps", "茶具")


def in_thread(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async function to completion on a thread of its own (the caller's thread may
    be running an event loop already, e.g. Playwright's)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, fn).result()


def _unique_png(base: bytes, tag: str) -> bytes:
    """``base`` with a tEXt chunk naming ``tag`` before IEND: another file, same pixels."""
    body = b"batcher\0" + tag.encode()
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
    return base[:-12] + chunk + base[-12:]


def photo_png(number: int, size: int) -> bytes:
    """A photograph-like ``size`` x ``size`` RGB PNG: smooth patches of colour under a fine
    grain, so it deflates about as badly as a photograph does (~1.4 MB at 1024 x 1024)."""
    from PIL import Image, ImageChops

    rng = random.Random(number)
    patches = Image.new("RGB", (6, 6))
    patches.putdata(
        [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(36)]
    )
    im = patches.resize((size, size), Image.Resampling.BICUBIC)
    side = max(1, size // 8)
    grain = Image.merge("RGB", [Image.effect_noise((side, side), 32) for _ in range(3)])
    im = ImageChops.add(im, grain.resize((size, size), Image.Resampling.BICUBIC), offset=-128)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _spec(i: int) -> JobSpec:
    folder = FOLDERS[i % len(FOLDERS)]
    output = f"{folder}/job-{i:05d}.png"
    return JobSpec(
        id=f"job-{i:05d}",
        model="z-image-turbo",
        prompt=f"product photo {i} of a {folder} item, studio light",
        size="1024*1024",
        seed=1000 + i,
        prompt_extend=False,
        output=output,
        output_key=output.casefold(),
        line=i + 2,
    )


def fabricate_run(
    root: Path, *, jobs: int, done: int, size: int = 1024, photos: bool = False
) -> Path:
    """A run folder at ``root`` with ``jobs`` jobs, the first ``done`` of them done with an
    image each (photograph-like with ``photos``), the rest pending. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)

    async def load() -> None:
        async with await JobStore.open(root / "batcher.db") as store:
            await store.import_specs((_spec(i) for i in range(jobs)), source="fabricated")
            await store.set_meta("rps", "2.0")

    in_thread(load)
    add_done_images(root, range(done), size=size, photos=photos)
    return root


def add_done_images(root: Path, numbers: range, *, size: int = 1024, photos: bool = False) -> None:
    """Write images for jobs ``numbers`` and record them done, as a run would."""
    bases = [
        photo_png(b, size)
        if photos
        else render_png(prompt=f"fabricated picture {b}", seed=b, width=size, height=size)
        for b in range(_BASES // 3 if photos else _BASES)  # a photograph takes ~0.4 s
    ]
    updates = []
    for i in numbers:
        spec = _spec(i)
        data = _unique_png(bases[i % len(bases)], spec.id)
        path = root / "images" / spec.output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        t = T0 + i * 0.5  # two images a second, the default quota
        updates.append(
            (
                f"req-{i:08d}",
                hashlib.sha256(data).hexdigest(),
                len(data),
                size,
                size,
                800.0 + (i * 37) % 2400,
                t - 2.0,
                t,
                t + 0.3,
                spec.id,
            )
        )
    con = sqlite3.connect(root / "batcher.db")
    try:
        con.executemany(
            "UPDATE jobs SET state = 'done', request_id = ?, sha256 = ?, bytes = ?, width = ?, "
            "height = ?, latency_ms = ?, started_at = ?, generated_at = ?, finished_at = ?, "
            "attempts = 1, billed = 1, cost_micros = 15000, currency = 'USD', "
            "endpoint = 'emulator' WHERE id = ?",
            updates,
        )
        con.commit()
    finally:
        con.close()
