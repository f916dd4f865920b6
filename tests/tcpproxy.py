"""A TCP forwarder the tests put between a worker and PostgreSQL, to cut the network (no tests).

:class:`TcpProxy` listens on 127.0.0.1 (a port of its own) and forwards every connection to
the target, on an event loop in a thread of the test process. :meth:`TcpProxy.cut` is a
network partition that says so: every open connection is reset and new ones are reset as soon
as they are accepted, until :meth:`TcpProxy.restore`. :meth:`TcpProxy.freeze` is one that
says nothing (packets dropped silently): connections stay open and new ones are accepted, but
no byte goes through either way until :meth:`TcpProxy.thaw`; what was held then goes on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy"]

_T = TypeVar("_T")

_CHUNK = 65536


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``host``:``target_port`` (see the module docstring).

    >>> with TcpProxy("127.0.0.1", 5432) as proxy:  # doctest: +SKIP
    ...     url = f"postgresql://postgres@127.0.0.1:{proxy.port}/test"
    ...     proxy.cut()
    ...     proxy.restore()
    """

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.accepted = 0  # connections accepted while not cut
        self.refused = 0  # connections reset because the proxy was cut
        self._cut = False
        self._flowing = asyncio.Event()  # cleared while frozen
        self._flowing.set()
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @classmethod
    def to(cls, target_url: str) -> TcpProxy:
        """A proxy to the server of ``target_url`` (a database URL); :meth:`url` gives the
        same database by way of it."""
        parts = urlsplit(target_url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, target_url: str) -> str:
        """``target_url`` (a database URL of the target) by way of this proxy."""
        parts = urlsplit(target_url)
        user = f"{parts.username}@" if parts.username else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._server = self._call(self._listen())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        """Reset every connection, and every new one, until :meth:`restore`."""
        self._call(self._cut_all())

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut = False

    def freeze(self) -> None:
        """Hold every byte, both ways, on every connection, until :meth:`thaw`."""
        self._call(self._flow(False))

    def thaw(self) -> None:
        """Let the bytes held, and what follows, through."""
        self._call(self._flow(True))

    async def _flow(self, on: bool) -> None:
        if on:
            self._flowing.set()
        else:
            self._flowing.clear()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> asyncio.Server:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _close(self) -> None:
        await self._cut_all()
        self._flowing.set()  # held pipes wake, find the proxy cut, and end
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _cut_all(self) -> None:
        self._cut = True
        for writer in list(self._open):
            writer.transport.abort()  # an RST, as a dropped route or a reset middlebox
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.accepted += 1
        self._open.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(_CHUNK):
                await self._flowing.wait()
                if self._cut:
                    return
                dst.write(data)
                await dst.drain()
        except OSError:
            return
        finally:
            dst.transport.abort()
