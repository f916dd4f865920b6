"""batcher's built-in DashScope emulator: a faithful local text-to-image server.

It serves the API as the README's "Models" section describes it, on loopback: the
synchronous generation call of every model in the registry, the asynchronous task API (create,
poll, cancel), the error envelope, seeded fault injection, per-key and per-model quotas, signed
expiring image URLs and ``GET /_emulator/stats``. Modules:

    config    EmulatorConfig and the --latency / --faults specs (pure)
    codes     the documented error codes and the error envelope (pure)
    validate  request validation (pure)
    faults    seeded per-request draws and the sliding-window quota (pure)
    urls      OSS-style signed URLs and XML errors (pure)
    images    cheap PNG drawing
    state     counters, quota windows and issued images of one emulator
    app       the generation and control routes
    downloads the image download route
    responses JSON answers and dropped connections
    server    running_emulator (in the current loop) and EmulatorThread (in a thread)
    cli       the ``emulate`` subcommand

Example::

    async with running_emulator(EmulatorConfig(latency="0", faults="500=0.1", seed=1)) as emu:
        ...  # point a DashScope client at emu.base_url
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batcher.emulator.config import EmulatorConfig, FaultKind

if TYPE_CHECKING:
    from batcher.emulator.server import Emulator, EmulatorThread, running_emulator

__all__ = ["Emulator", "EmulatorConfig", "EmulatorThread", "FaultKind", "running_emulator"]


def __getattr__(name: str) -> Any:
    """The server's names, imported on first use: ``batcher emulate``'s options are read
    without loading aiohttp's server."""
    if name in ("Emulator", "EmulatorThread", "running_emulator"):
        from batcher.emulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
