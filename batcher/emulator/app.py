"""The emulator's aiohttp application: the generation route and the control routes.

Routes::

    POST /api/v1/services/aigc/multimodal-generation/generation   z-image-turbo, Qwen-Image
    POST /api/v1/services/aigc/text2image/image-synthesis          Wan tasks (see taskroutes.py)
    GET  /api/v1/tasks/{task_id}, POST /api/v1/tasks/{id}/cancel   task poll and cancel
    GET  /1d/{xx}/{yyyymmdd}/{xxxxxxxx}/{uuid}.png                 images (see downloads.py)
    GET  /_emulator/stats                                          counters (JSON)
    GET  /_emulator/config, POST /_emulator/config                 settings; POST changes them
    *    /api/v1/...                                               anything else: 404 NotFound

A generation request goes through, in order: request numbering (for the seeded draws), the API
key (401), the async header (403), reading and validating the body (400/413), the per-key quota
(429 ``Throttling.RateQuota``, not counted against the quota), moderation (400
``DataInspectionFailed``), the injected fault if the draw picks one, the latency, and billing.
Injected faults only ever hit requests that would otherwise have succeeded, so the fraction asked
for is the fraction observed among valid, accepted requests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiohttp import web

from batcher.emulator.codes import ApiError, api_error, new_request_id
from batcher.emulator.config import FaultKind, FaultRule
from batcher.emulator.downloads import download_image
from batcher.emulator.faults import draw
from batcher.emulator.responses import STATE, drop_connection, json_response
from batcher.emulator.state import EmulatorState, StoredImage
from batcher.emulator.taskroutes import add_task_routes
from batcher.emulator.urls import image_path
from batcher.emulator.validate import (
    GenerationRequest,
    check_async_header,
    is_moderated,
    parse_body,
)
from batcher.models import MODELS

__all__ = ["GENERATION_PATH", "STATE", "build_app"]

GENERATION_PATH = "/api/v1/services/aigc/multimodal-generation/generation"

_HANG_POLL_SECONDS = 0.05
_EXTEND_SUFFIX = (
    ", rendered in rich detail with a balanced composition, soft natural light "
    "and a harmonious colour palette"
)


def build_app(state: EmulatorState) -> web.Application:
    """The aiohttp application serving ``state``."""
    app = web.Application()
    app[STATE] = state
    app.router.add_post(GENERATION_PATH, _generate)
    add_task_routes(app)
    app.router.add_get("/1d/{shard}/{day}/{prefix}/{name}", download_image)
    app.router.add_get("/_emulator/stats", _stats)
    app.router.add_get("/_emulator/config", _get_config)
    app.router.add_post("/_emulator/config", _post_config)
    app.router.add_route("*", "/api/v1/{tail:.*}", _not_found)
    return app


async def _generate(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    number = state.next_generation()
    request_id = new_request_id()
    key = state.caller(request.headers.get("Authorization"))
    if isinstance(key, ApiError):
        return _error(state, key, request_id)
    refusal = check_async_header(request.headers.get("X-DashScope-Async"))
    if refusal is not None:
        return _error(state, refusal, request_id)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(state, api_error("BadRequest.TooLarge"), request_id)
    parsed = parse_body(raw)
    if isinstance(parsed, ApiError):
        return _error(state, parsed, request_id)
    if not state.try_quota(key, parsed.model, time.monotonic()):
        state.throttled += 1
        return _error(state, api_error("Throttling.RateQuota"), request_id)
    if is_moderated(parsed.prompt, state.config.moderate):
        return _error(state, api_error("DataInspectionFailed"), request_id)

    chance = draw(state.base_seed, "generate", number)
    latency = state.latency.seconds(chance.latency_z)
    seed = parsed.seed if parsed.seed is not None else chance.seed
    rule = state.plan.pick_generation(chance.fault_u)
    if rule is not None:
        state.faults_injected[rule.kind] += 1
        return await _inject(request, state, rule, parsed, latency, request_id)
    if not await _pause(state, latency):
        return drop_connection(request, state)
    state.bill(parsed, parsed.seed)
    return _success(request, state, parsed, seed, request_id)


async def _inject(
    request: web.Request,
    state: EmulatorState,
    rule: FaultRule,
    parsed: GenerationRequest,
    latency: float,
    request_id: str,
) -> web.StreamResponse:
    if rule.error is not None:
        # A server-side failure happens during generation; a refusal comes at once.
        if rule.error.status >= 500 and not await _pause(state, latency):
            return drop_connection(request, state)
        return _error(state, rule.error, request_id)
    if rule.kind == FaultKind.LOST:
        if await _pause(state, latency):
            state.bill(parsed, parsed.seed)
    elif rule.kind == FaultKind.HANG:
        while not state.closing.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(_HANG_POLL_SECONDS)
    return drop_connection(request, state)


async def _pause(state: EmulatorState, seconds: float) -> bool:
    """Wait ``seconds``; False if the emulator began shutting down meanwhile."""
    state.latency_seconds_total += seconds
    if seconds <= 0:
        return True
    try:
        await asyncio.wait_for(state.closing.wait(), seconds)
    except TimeoutError:
        return True
    return False


def _error(state: EmulatorState, error: ApiError, request_id: str) -> web.Response:
    state.by_status[str(error.status)] += 1
    headers = None
    if error.status == 429 and state.config.retry_after is not None:
        headers = {"Retry-After": state.config.retry_after}
    return json_response(error.status, error.body(request_id), headers)


def _success(
    request: web.Request,
    state: EmulatorState,
    parsed: GenerationRequest,
    seed: int,
    request_id: str,
) -> web.Response:
    now = time.time()
    image_id = str(uuid.uuid4())
    path = image_path(image_id, now)
    expires = int(now + state.config.url_ttl)
    url = f"http://{request.host}{path}?{state.signer.query(path, expires)}"
    text, reasoning = parsed.prompt, ""
    usage: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    if parsed.prompt_extend:
        text = parsed.prompt + _EXTEND_SUFFIX
        reasoning = (
            f'The user wants an image of "{parsed.prompt[:80]}". I will keep the subject, '
            "then add detail, composition, lighting and colour to make the prompt richer."
        )
        reasoning_tokens = 40 + len(reasoning) // 4
        output_tokens = reasoning_tokens + len(text) // 3
        input_tokens = 300 + len(parsed.prompt) // 3
        usage = {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        }
    state.store_image(
        image_id, StoredImage(text=text, seed=seed, width=parsed.width, height=parsed.height)
    )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": [{"image": url}, {"text": text}],
        "reasoning_content": reasoning,
    }
    if not MODELS[parsed.model].answer_text:  # Qwen-Image: the image alone
        message = {"role": "assistant", "content": [{"image": url}]}
        usage = {}
    body = {
        "output": {"choices": [{"finish_reason": "stop", "message": message}]},
        "usage": {"width": parsed.width, "height": parsed.height, "image_count": 1, **usage},
        "request_id": request_id,
    }
    state.by_status["200"] += 1
    return json_response(200, body)


async def _not_found(request: web.Request) -> web.Response:
    error = api_error("NotFound", f"No such API: {request.method} {request.path}")
    return json_response(404, error.body(new_request_id()))


async def _stats(request: web.Request) -> web.Response:
    return json_response(200, request.app[STATE].stats())


async def _get_config(request: web.Request) -> web.Response:
    return json_response(200, request.app[STATE].config.public_dict())


async def _post_config(request: web.Request) -> web.Response:
    """Apply a JSON object of changes, e.g. ``{"faults": "Arrearage=1"}``."""
    state = request.app[STATE]
    try:
        changes = await request.json()
    except ValueError:
        return json_response(400, {"error": "the body must be a JSON object of settings to change"})
    if not isinstance(changes, dict):
        return json_response(400, {"error": "the body must be a JSON object of settings to change"})
    try:
        config = state.reconfigure(**changes)
    except (TypeError, ValueError) as exc:
        return json_response(400, {"error": str(exc)})
    return json_response(200, config.public_dict())
