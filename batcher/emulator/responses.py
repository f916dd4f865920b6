"""How the emulator answers besides plain success: JSON bodies and dropped connections.

Shared by the generation routes (:mod:`batcher.emulator.app`) and the image downloads
(:mod:`batcher.emulator.downloads`), with the application key under which the state lives.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from aiohttp import web

from batcher.emulator.state import EmulatorState

__all__ = ["STATE", "drop_connection", "json_response"]

STATE = web.AppKey("emulator_state", EmulatorState)


def json_response(
    status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response (``ensure_ascii=False``: CJK prompts stay readable)."""
    return web.Response(
        status=status,
        text=json.dumps(body, ensure_ascii=False),
        content_type="application/json",
        headers=headers,
    )


def drop_connection(request: web.Request, state: EmulatorState) -> web.StreamResponse:
    """Reset the connection (RST, no response); the returned response is never sent."""
    state.connections_dropped += 1
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)
