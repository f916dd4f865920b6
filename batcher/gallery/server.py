"""``batcher review``: the report served from 127.0.0.1, with approve / reject / a note per image.

The page is the static report's, refreshed at start; on ``http://`` with the token in its
address it shows the review buttons and polls ``api/changes`` every two seconds, so images a
run is writing into the same folder appear while it runs.

Safety:

* bound to 127.0.0.1 unless ``--host`` says otherwise; while on loopback, a request naming
  another host (a DNS-rebinding page) is refused;
* every write (``POST api/review``, ``POST api/note``) needs the random token printed in the
  URL, in the ``X-Batcher-Token`` header: without it, 403;
* files are served only from the report folder, ``images/`` and ``history/`` of the run
  folder: a path is resolved (symlinks too) and refused unless it stays inside;
* a mark is one short write transaction of the review columns (:meth:`JobStore.set_review`),
  never a state move, so a run writing the same folder is not held up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from jobs import JobStore, JobStoreError, UnknownJob

from ..errors import ConfigError
from ..layout import RunLayout, RunLock
from ..metadata import STATE_KEY, MetadataWriter
from .data import Links, job_record
from .site import build_report, check_output
from .thumbs import ThumbJob, make_thumbs

__all__ = ["ReviewServer", "cmd_review"]

TOKEN_HEADER = "X-Batcher-Token"
_OVERLAP = 2.0  # seconds a poll looks back, for writes committed while the last one ran
_THUMBS_PER_POLL = 100


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.json_response(
        payload, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False)
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ReviewServer:
    """The review page's HTTP application for one run folder."""

    def __init__(self, store: JobStore, layout: RunLayout, *, token: str, loopback: bool) -> None:
        self.store = store
        self.layout = layout
        self.token = token
        self.loopback = loopback
        self.out = layout.report
        self.links = Links.between(layout, self.out)
        self.started_at = store.clock()
        self.marked = False  # metadata.jsonl needs rewriting for the marks made here
        self._roots = {
            "images": layout.images.resolve(),
            "history": layout.history.resolve(),
        }

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/api/changes", self.changes)
        app.router.add_post("/api/review", self.review)
        app.router.add_post("/api/note", self.note)
        app.router.add_route("*", "/api/{rest:.*}", self.not_found)
        app.router.add_get("/{path:.*}", self.file)
        return app

    # ------------------------------------------------------------------ safety

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.loopback:
            host = (request.host or "").rsplit(":", 1)[0].strip("[]")
            if not _is_loopback(host):
                return _json({"error": "this server answers only to 127.0.0.1"}, 403)
        if request.method not in ("GET", "HEAD"):
            given = request.headers.get(TOKEN_HEADER, "")
            if not given or not secrets.compare_digest(given, self.token):
                return _json({"error": "a write needs the token from the printed URL"}, 403)
        response: web.StreamResponse = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    def resolve(self, path: str) -> Path | None:
        """The file ``path`` names, if it is one under the report, images/ or history/."""
        if "\0" in path or "\\" in path:
            return None
        parts = [p for p in path.split("/") if p]
        if not parts:
            parts = ["index.html"]
        if parts[0] in self._roots:
            base, rest = self._roots[parts[0]], parts[1:]
        else:
            base, rest = self.out.resolve(), parts
        if any(p in (".", "..") for p in rest) or not rest:
            return None
        try:
            target = base.joinpath(*rest).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not target.is_relative_to(base) or not target.is_file():
            return None
        return target

    # ------------------------------------------------------------------ routes

    async def file(self, request: web.Request) -> web.StreamResponse:
        target = self.resolve(request.match_info["path"])
        if target is None:
            raise web.HTTPNotFound(text="not found")
        response = web.FileResponse(target)
        if target.suffix in (".html", ".js"):
            response.headers["Cache-Control"] = "no-store"
        else:
            response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    async def not_found(self, request: web.Request) -> web.Response:
        return _json({"error": "no such endpoint"}, 404)

    async def changes(self, request: web.Request) -> web.Response:
        """Jobs changed since ``?since=`` (default: when the page's data was written)."""
        try:
            since = float(request.query.get("since", self.started_at))
        except ValueError:
            return _json({"error": "since must be a number"}, 400)
        now = self.store.clock()
        changed = await self.store.changed_since(since)
        records = await self._records(changed)
        return _json({"since": now - _OVERLAP, "jobs": records})

    async def _records(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        history: dict[str, list[dict[str, Any]]] = {}
        ids = [r["id"] for r in recs]
        for at in range(0, len(ids), 500):
            async for h in self.store.iter_history(job_ids=ids[at : at + 500]):
                history.setdefault(h["job_id"], []).append(h)
        out = [job_record(r, self.links, self.layout, history.get(r["id"], ())) for r in recs]
        # every image of a job of several, else the job's one image
        shown = [
            (image["output"], image["thumb"])
            for r in out
            for image in r.get("images") or ([r] if r.get("thumb") else [])
        ]
        wanted = [
            ThumbJob(self.layout.images / output, self.out / thumb)
            for output, thumb in shown
            if not (self.out / thumb).exists()
        ][:_THUMBS_PER_POLL]
        if wanted:
            await anyio.to_thread.run_sync(lambda: make_thumbs(wanted, processes=1))
        return out

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text="the body must be JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("id"), str):
            raise web.HTTPBadRequest(text="the body must be a JSON object with an id")
        return body

    async def review(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        mark = body.get("review")
        if mark not in ("approved", "rejected", None):
            return _json({"error": "review must be approved, rejected or null"}, 400)
        return await self._write(lambda: self.store.set_review(body["id"], mark))

    async def note(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        note = body.get("note")
        if note is not None and not isinstance(note, str):
            return _json({"error": "note must be text"}, 400)
        if note is not None and len(note) > 4000:
            return _json({"error": "a note is at most 4000 characters"}, 400)
        return await self._write(lambda: self.store.set_note(body["id"], note))

    async def _write(self, fn: Any) -> web.Response:
        try:
            rec = await fn()
        except JobStoreError as exc:
            status = 404 if isinstance(exc, UnknownJob) else 409
            return _json({"error": str(exc)}, status)
        self.marked = True
        # metadata.jsonl carries the marks: a run ending later rewrites it whole
        await self.store.set_meta(STATE_KEY, "")
        [record] = await self._records([rec])
        return _json({"job": record})

    async def rewrite_metadata(self) -> bool:
        """Bring metadata.jsonl up to date with the marks, unless a run holds the folder (it
        rewrites the file itself when it ends). Returns whether it was written."""
        if not self.marked:
            return False
        if self.layout.shared:
            # A shared table's workers hold no folder lock: the files are rewritten now, and
            # a worker that appended meanwhile finds its count off at its end and rewrites
            # them again (the marks are in the table, so nothing is lost either way).
            await MetadataWriter(self.store, self.layout).refresh()
            self.marked = False
            return True
        lock = RunLock(self.layout.lock)
        try:
            lock.acquire()
        except ConfigError:
            return False
        try:
            await MetadataWriter(self.store, self.layout).refresh()
        finally:
            lock.release()
        self.marked = False
        return True


async def cmd_review(folder: Path, *, host: str, port: int, database: str | None = None) -> int:
    """``batcher review DIR [--db URL]``: refresh the report, serve it with marks until
    Ctrl-C. ``database``: the run's table is in PostgreSQL (the folder holds its images)."""
    layout = RunLayout.locate(folder, database)
    if not layout.has_store():
        raise layout.no_store()
    token = secrets.token_urlsafe(18)
    async with await JobStore.open(layout.store, create=False) as store:
        server = ReviewServer(store, layout, token=token, loopback=_is_loopback(host))
        check_output(layout.report)
        runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            try:
                await site.start()
            except (OSError, OverflowError) as exc:
                raise ConfigError(
                    f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}; "
                    "choose another --port or --host"
                ) from None
            built = await build_report(store, layout)  # listening already: the port is ours
            bound = runner.addresses[0][1] if runner.addresses else port
            shown = f"[{host}]" if ":" in host else host
            print(f"http://{shown}:{bound}/?token={token}", flush=True)
            print(
                f"batcher: reviewing {built.jobs:,} jobs of {layout.root}; open the address "
                "above (keys: j/k next/previous, a approve, r reject, n note); Ctrl-C to stop",
                file=sys.stderr,
                flush=True,
            )
            if not server.loopback:
                print(
                    f"batcher: warning: listening on {host}: anyone who can reach it sees the "
                    "images (marks still need the token)",
                    file=sys.stderr,
                )
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _sig in signals:
                    break
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()
                with contextlib.suppress(OSError):
                    if await server.rewrite_metadata():
                        print(f"batcher: {layout.metadata} updated with the marks", file=sys.stderr)
    print(f"batcher: review stopped at {time.strftime('%H:%M:%S')}", file=sys.stderr)
    return 0
