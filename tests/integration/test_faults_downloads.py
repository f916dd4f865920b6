"""A download far larger than any valid image, or not an image at all, served
by a tiny aiohttp server of the test's own on 127.0.0.1: refused with a clear error, nothing
half-written (no file at the final path, no temporary file left), memory bounded (the body is
streamed to disk, never held whole).

The jobs are recorded as generated with their image URL pointing at that server (as if the
service had answered with it), then a real Runner over a real SQLite file downloads them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import tracemalloc
import zlib
from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web

from batcher.download import MAX_IMAGE_BYTES, download_image
from batcher.errors import DownloadError
from batcher.layout import RunLayout
from jobs import Generated, JobStore
from tests.support import FAST, check_invariants, make_specs, noise_png, run_once, serving

pytestmark = pytest.mark.anyio

SIG = b"\x89PNG\r\n\x1a\n"
MB = 1 << 20


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# a PNG that starts well (signature, IHDR 512*512) and then announces a 2 GB IDAT chunk
ENDLESS_HEAD = SIG + _chunk(b"IHDR", struct.pack(">IIBBBBB", 512, 512, 8, 2, 0, 0, 0))
ENDLESS_HEAD += struct.pack(">I", (1 << 31) - 1) + b"IDAT"
# made once, before any memory is measured (the server runs in the test's own process)
BLOCK = bytes(range(256)) * 4096  # 1 MB
ZEROS = bytes(6 * MB)  # not a PNG, and past the downloader's in-memory limit
SMALL_PNG = noise_png(64, 64)


async def _stream(request: web.Request, *, declared: int | None, head: bytes, total: int):
    resp = web.StreamResponse()
    resp.content_type = "image/png"
    if declared is not None:
        resp.content_length = declared
    await resp.prepare(request)
    block = BLOCK
    try:
        await resp.write(head)
        sent = len(head)
        while sent < total:
            await resp.write(block)
            sent += len(block)
    except (ConnectionError, aiohttp.ClientConnectionResetError, asyncio.CancelledError):
        pass  # the client hung up: that is the point
    return resp


def storage_app(stats: dict[str, int]) -> web.Application:
    async def count(request: web.Request) -> None:
        stats[request.path] = stats.get(request.path, 0) + 1

    async def declared_huge(request):
        await count(request)
        return await _stream(request, declared=50 << 30, head=ENDLESS_HEAD, total=64 * MB)

    async def endless(request):
        await count(request)  # chunked, no Content-Length: only counting bytes can stop it
        return await _stream(request, declared=None, head=ENDLESS_HEAD, total=200 * MB)

    async def html(request):
        await count(request)
        return web.Response(text="<html><body>Welcome to the captive portal</body></html>")

    async def zeros(request):
        await count(request)
        return web.Response(body=ZEROS, content_type="image/png")

    async def small_png(request):
        await count(request)  # a valid PNG, but not the size the API said
        return web.Response(body=SMALL_PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/declared-huge.png", declared_huge)
    app.router.add_get("/endless.png", endless)
    app.router.add_get("/portal.png", html)
    app.router.add_get("/zeros.png", zeros)
    app.router.add_get("/small.png", small_png)
    return app


async def record_generated(store: JobStore, urls: list[str], *, size: int = 512) -> None:
    claims = await store.claim(limit=len(urls), lease_seconds=30)
    for claim, url in zip(claims, urls, strict=True):
        await store.record_generated(
            claim.id,
            claim.token,
            Generated(
                request_id=f"req-{claim.id}",
                width=size,
                height=size,
                image_count=1,
                input_tokens=0,
                output_tokens=0,
                total_tokens=0,
                reasoning_tokens=None,
                actual_prompt=None,
                image_url=url,
                url_expires_at=None,
                latency_ms=1.0,
                cost=Decimal("0.015"),
                currency="USD",
            ),
            lease_seconds=30,
        )
        await store.release(claim.id, claim.token)


CASES = {
    "/declared-huge.png": ("Download.too_large", "bytes declared"),
    "/endless.png": ("Download.too_large", f"more than {MAX_IMAGE_BYTES} bytes"),
    "/portal.png": ("Download.corrupt", "not a PNG"),
    "/zeros.png": ("Download.corrupt", "not a PNG"),
    "/small.png": ("Download.size_mismatch", "64*64"),
}


async def test_oversized_and_non_image_downloads_are_refused_cleanly(tmp_path):
    layout = RunLayout(tmp_path / "run")
    hits: dict[str, int] = {}
    async with await JobStore.open(layout.db) as store, serving(storage_app(hits)) as root:
        await store.import_specs(make_specs(len(CASES)), source="t.csv")
        await record_generated(store, [root + path for path in CASES])
        opts = dataclasses.replace(FAST, max_attempts=2)
        runner, _ = await run_once(store, layout, root + "/api/v1", options=opts)
        recs = [rec async for rec in store.iter_records()]
    assert runner.counters.calls == 0  # nothing generated again: the URLs were alive
    for rec, (path, (code, words)) in zip(recs, CASES.items(), strict=True):
        assert rec["state"] == "failed", (path, rec)
        assert rec["error_code"] == code, path
        assert words in rec["error_message"], (path, rec["error_message"])
        assert len(rec["error_message"]) < 300
        assert not (layout.images / rec["output"]).exists(), path
        assert hits[path] <= opts.max_attempts
    check_invariants(layout.root)  # no temporary file left either


@pytest.mark.parametrize("path", ["/endless.png", "/zeros.png"])
async def test_an_oversized_download_is_streamed_in_bounded_memory(tmp_path, path):
    """Held in memory, 32 MB refused would cost 32 MB or more; streamed, a few MB."""
    dest = tmp_path / "images" / "x.png"
    dest.parent.mkdir(parents=True)
    hits: dict[str, int] = {}
    async with serving(storage_app(hits)) as root, aiohttp.ClientSession() as session:
        tracemalloc.start()
        try:
            with pytest.raises(DownloadError) as info:
                await download_image(
                    session, root + path, dest, expect_width=512, expect_height=512
                )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.reason in ("too_large", "corrupt")
    assert peak < 16 * MB, f"peak {peak / MB:.1f} MB"
    assert list(dest.parent.iterdir()) == []  # nothing half-written, no temporary file
