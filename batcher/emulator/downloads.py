"""The image download route: signed-URL checks, lazy PNG drawing, download faults.

``GET /1d/{xx}/{yyyymmdd}/{xxxxxxxx}/{uuid}.png?Expires=&OSSAccessKeyId=&Signature=`` answers as
OSS would: 403 with an XML ``SignatureDoesNotMatch`` for a changed URL, ``AccessDenied`` "Request
has expired." past ``Expires``, ``AccessDenied`` without a signature, 404 ``NoSuchKey`` for an
image the emulator never issued or has forgotten, else 200 ``image/png`` with a correct
Content-Length, an ``ETag`` and a ``Content-MD5`` of the true bytes. An injected ``truncate``
sends half the bytes and resets the connection; ``corrupt`` sends the right number of bytes with
the PNG signature and a stretch of the middle inverted (the Content-MD5 stays the true one, as
when the damage happens on the way).
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid

from aiohttp import web

from batcher.emulator.config import FaultKind
from batcher.emulator.faults import draw
from batcher.emulator.images import render_png
from batcher.emulator.responses import STATE, drop_connection
from batcher.emulator.state import EmulatorState
from batcher.emulator.urls import UrlCheck, oss_error_xml

__all__ = ["download_image"]


async def download_image(request: web.Request) -> web.StreamResponse:
    """Serve one issued image (see the module docstring)."""
    state = request.app[STATE]
    is_get = request.method == "GET"
    number = state.next_download() if is_get else 0
    oss_request_id = uuid.uuid4().hex[:24].upper()
    query = request.query
    now = time.time()
    verdict = state.signer.check(
        request.path, query.get("Expires"), query.get("OSSAccessKeyId"), query.get("Signature"), now
    )
    if verdict is not UrlCheck.OK:
        return _oss_error(state, is_get, verdict, oss_request_id, query.get("Expires"), now)
    name = request.match_info["name"]
    image = state.image(name[:-4]) if name.endswith(".png") else None
    if image is None:
        xml = oss_error_xml("NoSuchKey", "The specified key does not exist.", oss_request_id)
        return _xml(state, is_get, 404, xml, oss_request_id)
    png = render_png(prompt=image.text, seed=image.seed, width=image.width, height=image.height)
    md5 = hashlib.md5(png, usedforsecurity=False).digest()
    headers = {
        "ETag": f'"{md5.hex().upper()}"',
        "Content-MD5": base64.b64encode(md5).decode(),
        "x-oss-request-id": oss_request_id,
        "x-oss-object-type": "Normal",
    }
    rule = state.plan.pick_download(draw(state.base_seed, "download", number).fault_u)
    if is_get:
        state.download_by_status["200"] += 1
    if is_get and rule is not None:
        state.faults_injected[rule.kind] += 1
        if rule.kind == FaultKind.TRUNCATE:
            response = web.StreamResponse(headers=headers)
            response.content_type = "image/png"
            response.content_length = len(png)
            await response.prepare(request)
            await response.write(png[: len(png) // 2])
            drop_connection(request, state)
            return response
        png = _corrupt(png)
    return web.Response(body=png, content_type="image/png", headers=headers)


def _corrupt(png: bytes) -> bytes:
    """Same length, not a PNG: the signature and a stretch of the middle are inverted."""
    damaged = bytearray(png)
    middle = len(damaged) // 2
    for index in (*range(min(8, len(damaged))), *range(middle, min(middle + 64, len(damaged)))):
        damaged[index] ^= 0xFF
    return bytes(damaged)


def _oss_error(
    state: EmulatorState,
    is_get: bool,
    verdict: UrlCheck,
    oss_request_id: str,
    expires: str | None,
    now: float,
) -> web.Response:
    if verdict is UrlCheck.EXPIRED and expires is not None:
        stamp = "%Y-%m-%dT%H:%M:%S.000Z"
        xml = oss_error_xml(
            "AccessDenied",
            "Request has expired.",
            oss_request_id,
            Expires=time.strftime(stamp, time.gmtime(int(expires))),
            ServerTime=time.strftime(stamp, time.gmtime(now)),
        )
    elif verdict is UrlCheck.MISSING:
        message = "You have no right to access this object because of bucket acl."
        xml = oss_error_xml("AccessDenied", message, oss_request_id)
    else:
        message = (
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method."
        )
        xml = oss_error_xml("SignatureDoesNotMatch", message, oss_request_id)
    return _xml(state, is_get, 403, xml, oss_request_id)


def _xml(
    state: EmulatorState, is_get: bool, status: int, xml: str, oss_request_id: str
) -> web.Response:
    if is_get:
        state.download_by_status[str(status)] += 1
    return web.Response(
        status=status,
        text=xml,
        content_type="application/xml",
        headers={"x-oss-request-id": oss_request_id},
    )
