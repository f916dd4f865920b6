"""A finished run folder of N small images, made without the emulator.

Exports only read the job table and the image files, so a benchmark of 100,000 images does
not need 100,000 generation calls: the jobs are imported and moved to ``done`` through
:class:`jobs.JobStore` itself (claim, record_generated, record_files, complete_all), each
with a small real PNG written where the manifest puts it, half of them under ``train/`` and
the rest under ``test/``, with two manifest variables (``label``, an integer, and ``style``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import struct
import zlib
from decimal import Decimal
from pathlib import Path

import anyio

from batcher.layout import RunLayout
from jobs import Generated, JobStore, StoredFile

__all__ = ["emulator_png", "fabricate", "small_png"]

CHUNK = 2000
EMULATOR_VARIANTS = 256


def small_png(n: int, side: int = 16, *, noise: bool = False) -> bytes:
    """A valid ``side`` x ``side`` RGB PNG whose pixels depend on ``n``; with ``noise``, random
    pixels stored uncompressed (about 3 bytes a pixel, like a photograph's PNG)."""
    if noise:
        rng = random.Random(n)
        raw = b"".join(b"\x00" + rng.randbytes(side * 3) for _ in range(side))
    else:
        seed = hashlib.blake2b(str(n).encode(), digest_size=3).digest()
        row = b"\x00" + bytes(seed[i % 3] ^ (i * 7 & 0xFF) for i in range(side * 3))
        raw = row * side

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    buf = io.BytesIO()
    buf.write(b"\x89PNG\r\n\x1a\n")
    buf.write(chunk(b"IHDR", header))
    buf.write(chunk(b"IDAT", zlib.compress(raw, 0 if noise else 6)))
    buf.write(chunk(b"IEND", b""))
    return buf.getvalue()


@functools.lru_cache(maxsize=EMULATOR_VARIANTS)
def _emulator_variant(variant: int, side: int) -> bytes:
    from batcher.emulator.images import render_png

    prompt = _prompt(variant * 7 + 1)
    return render_png(prompt=prompt, seed=variant, width=side, height=side)


def emulator_png(n: int, side: int = 1328) -> bytes:
    """The emulator's own PNG for a job like ``n`` (its prompt wrapped on a colour, about
    11 kB at 1328 x 1328): :data:`EMULATOR_VARIANTS` different images drawn once each and
    reused, as drawing 20,000 would take minutes; every file is still written separately."""
    return _emulator_variant(n % EMULATOR_VARIANTS, side)


def _prompt(i: int) -> str:
    return f"a small test picture number {i}" if i % 4 else f"第 {i} 张测试图片"


def _rows(n: int, side: int) -> list[tuple[object, ...]]:
    rows = []
    for i in range(n):
        split = "train" if i % 2 == 0 else "test"
        job_id = f"img-{i:07d}"
        output = f"{split}/{job_id}.png"
        variables = json.dumps({"label": i % 10, "style": "photo" if i % 3 else "sketch"})
        prompt = _prompt(i)
        size = f"{side}*{side}"
        rows.append(
            (
                job_id,
                i + 2,
                "z-image-turbo",
                prompt,
                size,
                i,
                False,
                output,
                output,
                1,
                None,
                variables,
            )
        )
    return rows


async def fabricate(
    root: Path, n: int, *, side: int = 16, noise: bool = False, emulator: bool = False
) -> RunLayout:
    """Make ``root`` a run folder of ``n`` done jobs with their images (``side`` pixels
    square: random pixels with ``noise``, the emulator's drawing with ``emulator``); returns
    its layout."""
    layout = RunLayout(root)
    layout.images.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (layout.images / split).mkdir(exist_ok=True)
    async with await JobStore.open(layout.db) as store:
        await store.import_rows(_rows(n, side), source="fabricated")  # type: ignore[arg-type]
        while claims := await store.claim(limit=CHUNK, lease_seconds=600):
            async with anyio.create_task_group() as tg:
                for claim in claims:
                    gen = Generated(
                        request_id=f"req-{claim.id}",
                        width=side,
                        height=side,
                        image_count=1,
                        input_tokens=0,
                        output_tokens=0,
                        total_tokens=0,
                        reasoning_tokens=0,
                        actual_prompt=None,
                        image_url="http://127.0.0.1:1/x.png",
                        url_expires_at=None,
                        latency_ms=1.0,
                        cost=Decimal("0.015"),
                        currency="USD",
                    )
                    tg.start_soon(_generated, store, claim.id, claim.token, gen)
            files = []
            for claim in claims:
                number = int(claim.id.split("-")[1])
                if emulator:
                    data = emulator_png(number, side)
                else:
                    data = small_png(number, side, noise=noise)
                split = "train" if number % 2 == 0 else "test"
                (layout.images / split / f"{claim.id}.png").write_bytes(data)
                stored = StoredFile(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
                files.append((claim.id, claim.token, stored))
            await store.record_files(files)
            await store.complete_all(files)
    return layout


async def _generated(store: JobStore, job_id: str, token: str, gen: Generated) -> None:
    await store.record_generated(job_id, token, gen, lease_seconds=600)
