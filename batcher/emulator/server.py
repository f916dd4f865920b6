"""Starting and stopping the emulator: in the current event loop, or in a thread of its own.

In async code (tests, ``batcher run --emulate``)::

    async with running_emulator(EmulatorConfig(latency="0")) as emu:
        ...  # talk to emu.base_url
        emu.reconfigure(faults="Arrearage=1")
        print(emu.stats()["images_billed"])

In synchronous code (the SDK compatibility test, a benchmark baseline)::

    with EmulatorThread(EmulatorConfig(latency="0")) as emu:
        ...  # same attributes and methods, callable from this thread

Stopping first wakes every hung or sleeping request (they drop their connections), then closes
the listening socket and the open connections, so shutdown takes milliseconds whatever the
injected faults were doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from batcher.emulator.app import build_app
from batcher.emulator.config import EmulatorConfig
from batcher.emulator.state import EmulatorState

__all__ = ["Emulator", "EmulatorThread", "running_emulator"]

_T = TypeVar("_T")
_SHUTDOWN_TIMEOUT = 1.0
_BACKLOG = 1024  # a benchmark may open hundreds of connections at once
_THREAD_START_TIMEOUT = 30.0


class Emulator:
    """A running emulator: where it listens, its counters, its run-time settings."""

    def __init__(self, state: EmulatorState, host: str, port: int) -> None:
        self._state = state
        self.host = host
        self.port = port

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT``, where image URLs and ``/_emulator/...`` live."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/api/v1``: what a DashScope client uses as its base URL."""
        return f"{self.root_url}/api/v1"

    @property
    def config(self) -> EmulatorConfig:
        """The settings in force."""
        return self._state.config

    def stats(self) -> dict[str, Any]:
        """The counters, as ``GET /_emulator/stats`` returns them."""
        return self._state.stats()

    def reconfigure(self, **changes: Any) -> EmulatorConfig:
        """Change faults, rps, latency, moderate, url_ttl or retry_after; returns the settings.

        Raises ``ValueError`` for a bad value or a field that cannot change while running.
        """
        return self._state.reconfigure(**changes)


@contextlib.asynccontextmanager
async def running_emulator(config: EmulatorConfig) -> AsyncIterator[Emulator]:
    """Serve the emulator in the running asyncio event loop for the duration of the block."""
    state = EmulatorState(config)
    runner = web.AppRunner(
        build_app(state), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT, handle_signals=False
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=_BACKLOG, reuse_address=True)
        await site.start()
        address = runner.addresses[0]
        yield Emulator(state, str(address[0]), int(address[1]))
    finally:
        state.closing.set()
        await asyncio.sleep(0)  # let woken handlers drop their connections
        await runner.cleanup()


class EmulatorThread:
    """The emulator in a background thread with its own event loop, for synchronous callers.

    A context manager; ``base_url``, ``root_url``, ``stats()`` and ``reconfigure()`` behave as on
    :class:`Emulator` and may be used from any thread.
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._emulator: Emulator | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start serving; returns once the port is open (or raises what prevented it)."""
        if self._thread is not None:
            raise RuntimeError("this EmulatorThread was already started")
        self._thread = threading.Thread(target=self._run, name="batcher-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(_THREAD_START_TIMEOUT):
            raise RuntimeError("the emulator thread did not start in time")
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        if self._thread is None or self._loop is None or self._stop is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread has nobody else to tell
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with running_emulator(self._config) as emulator:
            self._emulator = emulator
            self._ready.set()
            await self._stop.wait()

    @property
    def emulator(self) -> Emulator:
        """The running emulator (only safe to read from this thread for plain attributes)."""
        if self._emulator is None:
            raise RuntimeError("the emulator thread is not running")
        return self._emulator

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT``."""
        return self.emulator.root_url

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/api/v1``."""
        return self.emulator.base_url

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.emulator.port

    def stats(self) -> dict[str, Any]:
        """The counters (read on the emulator's loop)."""
        return self._call(self.emulator.stats)

    def reconfigure(self, **changes: Any) -> EmulatorConfig:
        """Change run-time settings (applied on the emulator's loop); returns the settings."""
        return self._call(lambda: self.emulator.reconfigure(**changes))

    def _call(self, function: Callable[[], _T]) -> _T:
        if self._loop is None:
            raise RuntimeError("the emulator thread is not running")

        async def call() -> _T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()
