"""Helpers shared by the integration and acceptance tiers: job specs, a runner wired to a real
emulator and a real SQLite file, and the invariants every fault test ends on."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batcher.client import DashScopeClient
from batcher.layout import RunLayout
from batcher.png import PngVerifier
from batcher.pool import Runner, RunOptions, RunResult
from jobs import JobSpec, JobStore
from jobs.naming import image_output

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
    start_rps=None,  # no slow start: these emulators have no quota unless a test sets one
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


def check_invariants(root: Path, *, after_kill: bool = False) -> dict[str, int]:
    """The run-folder promises, checked on a run folder. Returns counts per state.

    ``after_kill``: the folder of a process just killed, before any run cleaned up after it; a
    temporary file may be left beside its final path then (the next run sweeps it away)."""
    layout = RunLayout(root)
    con = sqlite3.connect(layout.db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = con.execute(
            "SELECT id, state, output, sha256, bytes, width, height, n FROM jobs"
        ).fetchall()
        several: dict[str, list[tuple[int, str | None, int | None]]] = {}
        for job_id, index, sha, size in con.execute(
            "SELECT job_id, idx, sha256, bytes FROM job_images ORDER BY job_id, idx"
        ):
            several.setdefault(job_id, []).append((index, sha, size))
    finally:
        con.close()
    counts: dict[str, int] = {}
    outputs: set[str] = set()
    for job_id, state, output, sha, size, width, height, n in rows:
        counts[state] = counts.get(state, 0) + 1
        assert output.casefold() not in outputs, f"two jobs share {output}"
        outputs.add(output.casefold())
        if state == "done" and n > 1:
            # a job of several images: each recorded image's file, the first one's hash on
            # the job's own row
            found = several.get(job_id, [])
            assert found, f"{job_id} is done with no image recorded"
            assert found[0][1] == sha, f"{job_id}: the job's hash is not its first image's"
            for index, image_sha, image_size in found:
                path = layout.images / image_output(output, index, n)
                assert path.is_file(), f"{job_id} is done but {path} is missing"
                data = path.read_bytes()
                assert hashlib.sha256(data).hexdigest() == image_sha, f"{path}: hash differs"
                assert len(data) == image_size
                assert png_size(path) == (width, height)
        elif state == "done":
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
    assert after_kill or not leftovers, f"temporary files left: {leftovers[:3]}"
    return counts


def run_args(
    manifest: str | os.PathLike[str], out: str | os.PathLike[str], base_url: str, *extra: str
) -> list[str]:
    """``batcher run`` against a loopback emulator, made quick: a high --rps (the emulator in
    these tests has no quota unless a test sets one) from the first call (no slow start), a
    10 s request timeout, a short backoff, no progress display.
    A test may pass its own flags after: the last one given wins."""
    return [
        "run", str(manifest), "--out", str(out), "--base-url", base_url, "--no-progress",
        "--rps", "1000", "--start-rps", "1000", "--request-timeout", "10",
        "--backoff-base", "0.01", *extra,
    ]  # fmt: skip


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


# --------------------------------------------------------------------------------------------
# Additions for the fault tests: a loopback server of a test's own, a large valid PNG,
# a look at a run folder from outside.


def noise_png(width: int, height: int, *, seed: int = 0) -> bytes:
    """A valid RGB PNG of random pixels stored uncompressed: about ``3 * width * height`` bytes,
    so a 2048*2048 one (12.6 MB) takes the downloader's spill-to-disk path."""
    import random
    import struct
    import zlib

    rng = random.Random(seed)
    row = 1 + 3 * width
    raw = bytearray(rng.randbytes(row * height))
    raw[::row] = bytes(height)  # filter byte 0 at the start of every row
    data = zlib.compress(bytes(raw), 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


class ServerThread:
    """An aiohttp application of a test's own on ``127.0.0.1:0``, served from a thread of its own
    (for synchronous acceptance tests). ``url`` is ``http://127.0.0.1:PORT``; ``closing`` is set
    when it stops, so handlers that stall on purpose can poll it and end."""

    def __init__(self, app: Any) -> None:
        import threading

        self._app = app
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._ready = threading.Event()
        self.closing = threading.Event()
        self.url = ""
        self._loop: Any = None
        self._stop: Any = None

    def _run(self) -> None:
        import asyncio

        async def serve() -> None:
            from aiohttp import web

            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                self.closing.set()
                await runner.cleanup()

        asyncio.run(serve())

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the test server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def db_states(db: Path) -> dict[str, int]:
    """Jobs per state, read from outside the process that owns the run folder."""
    con = sqlite3.connect(db, timeout=10)
    try:
        return dict(con.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    finally:
        con.close()


def files_under(root: Path) -> set[str]:
    """Every file and link below ``root`` (relative, as strings), to see what a run wrote."""
    found = set()
    for dirpath, dirs, files in os.walk(root):
        for name in [*files, *dirs]:
            path = Path(dirpath) / name
            if path.is_file() or path.is_symlink():
                found.add(str(path.relative_to(root)))
    return found


async def generate_only(
    store: JobStore, base_url: str, n: int, *, lease_seconds: float = 30
) -> list[str]:
    """Claim ``n`` jobs and record a real generation for each without downloading it, then give
    them back: the state a crash right after "generated" leaves. Returns their ids."""
    from decimal import Decimal

    from jobs import Generated

    claims = await store.claim(limit=n, lease_seconds=lease_seconds)
    async with aiohttp.ClientSession() as session:
        client = DashScopeClient(session, base_url=base_url, api_key="sk-test-key")
        for c in claims:
            r = await client.generate(
                model=c.model, prompt=c.prompt, size=c.size, seed=c.seed, prompt_extend=False
            )
            gen = Generated(
                request_id=r.request_id,
                width=r.width,
                height=r.height,
                image_count=1,
                input_tokens=0,
                output_tokens=0,
                total_tokens=0,
                reasoning_tokens=None,
                actual_prompt=None,
                image_url=r.image_url,
                url_expires_at=r.url_expires_at,
                latency_ms=r.latency_ms,
                cost=Decimal("0.015"),
                currency="USD",
            )
            await store.record_generated(c.id, c.token, gen, lease_seconds=lease_seconds)
            await store.release(c.id, c.token)
    return [c.id for c in claims]


class ImageRelay:
    """A relay in front of the emulator that controls how images download.

    API calls (``POST`` and ``GET /api/v1/...``: generations, tasks and their polls) go
    through to the emulator at ``upstream`` unchanged
    (so it still bills them), but the image URLs in its answers are rewritten to this relay's
    own host, whose ``GET /1d/...`` answers as ``mode`` says (it may be changed at any time,
    from any thread):

    - ``"pass"``: the emulator's image;
    - ``"stall"``: nothing at all until the mode changes (but the first ``pass_first``
      downloads, which pass);
    - ``"403"``: storage's 403 AccessDenied (not an expiry);
    - ``"body"``: ``body`` at once;
    - ``"slow"``: the first ``first`` bytes of ``body`` at once (Content-Length of all of it),
      then nothing more while the mode stays ``"slow"``, then the rest.

    ``app()`` builds the aiohttp application: serve it with :class:`ServerThread`, or in the
    running loop with :func:`serving`. ``downloads`` counts image GETs; ``stalled`` those now
    waiting.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.mode = "pass"
        self.body = b""
        self.first = 0
        self.pass_first = 0
        self.downloads = 0
        self.stalled = 0
        self.closing = False

    def app(self) -> Any:
        from aiohttp import web

        session_key = web.AppKey("session", aiohttp.ClientSession)

        async def session_ctx(app: web.Application) -> Any:
            async with aiohttp.ClientSession() as session:
                app[session_key] = session
                yield
            self.closing = True

        async def api(request: web.Request) -> web.StreamResponse:
            session = request.app[session_key]
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with session.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers
            ) as up:
                text = (await up.read()).decode("utf-8")
                out = {k: v for k, v in up.headers.items() if k.lower() == "retry-after"}
            text = text.replace(self.upstream + "/1d/", f"http://{request.host}/1d/")
            return web.Response(
                status=up.status, text=text, content_type="application/json", headers=out
            )

        async def wait_while(mode: str) -> None:
            import asyncio

            self.stalled += 1
            try:
                # polled: the mode is changed from other threads, where an Event cannot be set
                while self.mode == mode and not self.closing:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            finally:
                self.stalled -= 1

        async def image(request: web.Request) -> web.StreamResponse:
            self.downloads += 1
            if self.mode == "stall" and self.downloads > self.pass_first:
                await wait_while("stall")
            mode = self.mode
            if mode == "403":
                xml = "<Error><Code>AccessDenied</Code><Message>Access denied.</Message></Error>"
                return web.Response(status=403, text=xml, content_type="application/xml")
            if mode == "body":
                return web.Response(body=self.body, content_type="image/png")
            if mode == "slow":
                resp = web.StreamResponse()
                resp.content_type = "image/png"
                resp.content_length = len(self.body)
                await resp.prepare(request)
                await resp.write(self.body[: self.first])
                await wait_while("slow")
                await resp.write(self.body[self.first :])
                await resp.write_eof()
                return resp
            session = request.app[session_key]
            async with session.get(self.upstream + request.path_qs) as up:
                data = await up.read()
                return web.Response(status=up.status, body=data, content_type=up.content_type)

        app = web.Application()
        app.cleanup_ctx.append(session_ctx)
        app.router.add_post("/api/v1/{tail:.*}", api)
        app.router.add_get("/api/v1/{tail:.*}", api)
        app.router.add_get("/1d/{tail:.*}", image)
        return app


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """Serve an aiohttp application on ``127.0.0.1:0`` in the running loop; yields its root URL."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def whole_db_jobs(db: Path) -> int:
    """The jobs in the SQLite file ``db`` (withdrawn ones included), once SQLite's integrity
    check passed and the file is in WAL mode, as the store always leaves it."""
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        return int(con.execute("SELECT count(*) FROM jobs").fetchone()[0])
    finally:
        con.close()


def _namespace_prefix(path: Path) -> list[str] | None:
    """A command prefix that runs its command with ``path`` bind-mounted read-only in a
    private mount namespace (root ignores permissions), or None where that cannot be made."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(path)]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[list[str]]:
    """Run commands with ``path`` read-only: yields the command prefix to use."""
    if os.geteuid() == 0:
        prefix = _namespace_prefix(path)
        if prefix is None:
            pytest.skip("running as root without user namespaces: cannot make a folder read-only")
        yield prefix
        return
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if not p.is_symlink()}
    for p, mode in modes.items():
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield []
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
