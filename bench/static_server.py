"""A static file server on 127.0.0.1 for download benchmarks: every file of a folder, from memory.

``python -m bench.static_server FOLDER`` prints one line with its URL (``http://127.0.0.1:PORT``)
and serves ``GET /NAME`` (any query string ignored) with the bytes of ``FOLDER/NAME`` read once
at start, over HTTP/1.1 with keep-alive and a listen backlog of 1024, until SIGTERM or SIGINT.
Unlike ``python -m http.server`` (HTTP/1.0, a backlog of 5: concurrent clients see their SYNs
dropped and retried a second later), it does not make a concurrent client look slow.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web


async def serve(files: dict[str, bytes], folder: Path) -> None:

    async def handler(request: web.Request) -> web.Response:
        body = files.get(request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    print(f"serving {folder} on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m bench.static_server FOLDER", file=sys.stderr)
        return 2
    folder = Path(sys.argv[1])
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    asyncio.run(serve(files, folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
