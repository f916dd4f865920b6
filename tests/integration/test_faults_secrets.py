"""Whatever a server sends back, even the request's own key
echoed in an error message, a body or a header, no exception the client raises shows the key:
not its str(), not its repr(), not a formatted traceback with its chained causes.

A server of the test's own on 127.0.0.1 answers each path with one kind of hostile answer.
(The CLI's part, the database, the run folder, logs, exports and output, is in
tests/acceptance/test_crash_secrets.py.)
"""

from __future__ import annotations

import asyncio
import json
import traceback

import aiohttp
import pytest
from aiohttp import web

from batcher.client import DashScopeClient
from batcher.errors import BatcherError
from tests.support import serving

pytestmark = pytest.mark.anyio

KEYS = [
    "sk-5ec2e7f1d0c94b7ba1e2f3a4b5c6d7e8",  # the shape of a real DashScope key
    "Zq7-distinctive-workspace-key-4242",  # a key of another shape, echoed as it is
]


def key_of(request: web.Request) -> str:
    return request.headers.get("Authorization", "").removeprefix("Bearer ")


def hostile_app() -> web.Application:
    async def echo_401(request):
        key = key_of(request)
        body = {"code": "InvalidApiKey", "message": f"Invalid API-key provided: {key}"}
        return web.json_response({**body, "request_id": "r-1"}, status=401)

    async def echo_bearer_400(request):
        auth = request.headers["Authorization"]
        body = {"code": "InvalidParameter", "message": f"bad header {auth!r}", "request_id": "r-2"}
        return web.json_response(body, status=400)

    async def echo_text_500(request):
        lines = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
        return web.Response(status=500, text=f"upstream failed for\n{lines}")

    async def echo_header_429(request):
        key = key_of(request)
        body = {"code": "Throttling", "message": "slow down", "request_id": "r-3"}
        return web.json_response(body, status=429, headers={"Retry-After": key})

    async def echo_200_not_json(request):
        return web.Response(text=f"<html>hello {key_of(request)}</html>")

    async def echo_200_no_image(request):
        body = {"output": {"choices": [{"message": {"content": [{"text": key_of(request)}]}}]}}
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def echo_code(request):
        body = {"code": f"Bad.{key_of(request)}", "message": "odd", "request_id": key_of(request)}
        return web.json_response(body, status=403)

    async def reset(request):
        request.transport.abort()
        return web.Response()

    async def hang(request):
        await asyncio.sleep(5)
        return web.Response()

    async def broken_http(request):
        # not HTTP at all: the client's parser fails (aiohttp raises ClientResponseError)
        request.transport.write(b"HTTP/1.1 abc not a status\r\n" + key_of(request).encode())
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    routes = {
        "echo-401": echo_401,
        "echo-bearer-400": echo_bearer_400,
        "echo-text-500": echo_text_500,
        "echo-header-429": echo_header_429,
        "echo-200-not-json": echo_200_not_json,
        "echo-200-no-image": echo_200_no_image,
        "echo-code": echo_code,
        "reset": reset,
        "hang": hang,
        "broken-http": broken_http,
    }
    app = web.Application()
    for name, handler in routes.items():
        app.router.add_post(
            f"/{name}/api/v1/services/aigc/multimodal-generation/generation", handler
        )
    return app


CASES = [
    "echo-401",
    "echo-bearer-400",
    "echo-text-500",
    "echo-header-429",
    "echo-200-not-json",
    "echo-200-no-image",
    "echo-code",
    "reset",
    "hang",
    "broken-http",
]


@pytest.mark.parametrize("key", KEYS, ids=["sk-key", "other-shape"])
async def test_no_client_exception_shows_the_key(key):
    async with serving(hostile_app()) as root, aiohttp.ClientSession() as session:
        for case in CASES:
            client = DashScopeClient(
                session, base_url=f"{root}/{case}/api/v1", api_key=key, request_timeout=0.3
            )
            assert key not in repr(client)
            with pytest.raises(BatcherError) as info:
                await client.generate(
                    model="z-image-turbo", prompt="p", size="512*512", seed=1, prompt_extend=False
                )
            exc = info.value
            shown = [
                str(exc),
                repr(exc),
                "".join(traceback.format_exception(exc)),
                repr(exc.args),
                *(repr(v) for v in vars(exc).values()),
            ]
            for text in shown:
                assert key not in text, (case, text)
