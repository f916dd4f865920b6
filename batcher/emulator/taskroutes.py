"""The asynchronous task API: create, poll and cancel (Wan text-to-image).

Routes::

    POST /api/v1/services/aigc/text2image/image-synthesis    create (X-DashScope-Async: enable)
    GET  /api/v1/tasks/{task_id}                              poll
    POST /api/v1/tasks/{task_id}/cancel                       cancel a PENDING task

A creation goes through the API key (401), the async header (403 without it), the body
(400), the model's quota (429 ``Throttling.RateQuota``), moderation (400), the model's
concurrent-task limit (429 ``Throttling``: that many tasks are neither ended nor cancelled),
then the generation fault draw: an error kind answers that error and creates nothing; ``reset``
drops the connection and creates nothing; ``lost`` creates the task and drops the answer;
``hang`` never answers. A poll counts in ``task_polls``, is limited to 20 a second per key,
and draws the poll faults (``poll-500``, ``poll-reset``). A task's own end (``task-failed``,
``task-partial``) is drawn when it is created.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web

from batcher.emulator.codes import ApiError, api_error, new_request_id
from batcher.emulator.config import FaultKind
from batcher.emulator.faults import draw
from batcher.emulator.responses import STATE, drop_connection, json_response
from batcher.emulator.state import EmulatorState
from batcher.emulator.tasks import Outcome, Task, TaskStatus, validate_task_payload
from batcher.emulator.validate import is_moderated
from batcher.models import MODELS

__all__ = ["TASK_CREATE_PATH", "add_task_routes"]

TASK_CREATE_PATH = "/api/v1/services/aigc/text2image/image-synthesis"
_HANG_POLL_SECONDS = 0.05


def add_task_routes(app: web.Application) -> None:
    """Add the task routes (before any catch-all route)."""
    app.router.add_post(TASK_CREATE_PATH, _create)
    app.router.add_get("/api/v1/tasks/{task_id}", _poll)
    app.router.add_post("/api/v1/tasks/{task_id}/cancel", _cancel)


def _error(state: EmulatorState, error: ApiError, request_id: str) -> web.Response:
    state.by_status[str(error.status)] += 1
    headers = None
    if error.status == 429 and state.config.retry_after is not None:
        headers = {"Retry-After": state.config.retry_after}
    return json_response(error.status, error.body(request_id), headers)


async def _create(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    number = state.next_generation()
    request_id = new_request_id()
    key = state.caller(request.headers.get("Authorization"))
    if isinstance(key, ApiError):
        return _error(state, key, request_id)
    if (request.headers.get("X-DashScope-Async") or "").strip().lower() != "enable":
        refusal = api_error("AccessDenied", "current user api does not support synchronous calls")
        return _error(state, refusal, request_id)
    try:
        payload = json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge:
        return _error(state, api_error("BadRequest.TooLarge"), request_id)
    except (UnicodeDecodeError, ValueError):
        return _error(state, api_error("BadRequest.IllegalInput"), request_id)
    parsed = validate_task_payload(payload)
    if isinstance(parsed, ApiError):
        return _error(state, parsed, request_id)
    now = time.monotonic()
    if not state.try_quota(key, parsed.model, now):
        state.throttled += 1
        return _error(state, api_error("Throttling.RateQuota"), request_id)
    if is_moderated(parsed.prompt, state.config.moderate):
        return _error(state, api_error("DataInspectionFailed"), request_id)
    state.settle_tasks(now, time.time())
    limit = MODELS[parsed.model].quota.concurrent_tasks
    if limit is not None and state.tasks.unfinished(key, parsed.model) >= limit:
        state.throttled += 1
        message = f"Too many concurrent tasks: {parsed.model} allows {limit} at a time."
        return _error(state, api_error("Throttling", message), request_id)
    chance = draw(state.base_seed, "generate", number)
    rule = state.plan.pick_generation(chance.fault_u)
    if rule is not None:
        state.faults_injected[rule.kind] += 1
        if rule.error is not None:
            return _error(state, rule.error, request_id)
        if rule.kind == FaultKind.RESET:
            return drop_connection(request, state)
        if rule.kind == FaultKind.HANG:
            while not state.closing.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await asyncio.sleep(_HANG_POLL_SECONDS)
            return drop_connection(request, state)
    task = _new_task(state, key, parsed, request.host, now, chance.seed)
    if rule is not None and rule.kind == FaultKind.LOST:
        return drop_connection(request, state)
    state.by_status["200"] += 1
    body = {"output": {"task_status": "PENDING", "task_id": task.id}, "request_id": request_id}
    return json_response(200, body)


def _new_task(
    state: EmulatorState, key: str, parsed: Any, host: str, now: float, drawn_seed: int
) -> Task:
    number = state.next_task()
    chance = draw(state.base_seed, "task", number)
    outcome = Outcome.SUCCEEDED
    rule = state.plan.pick_task(chance.fault_u)
    if rule is not None and (rule.kind != FaultKind.TASK_PARTIAL or parsed.n > 1):
        state.faults_injected[rule.kind] += 1
        outcome = Outcome.FAILED if rule.kind == FaultKind.TASK_FAILED else Outcome.PARTIAL
    task = Task(
        id=str(uuid.uuid4()),
        key=key,
        request=parsed,
        seed=parsed.seed if parsed.seed is not None else drawn_seed,
        host=host,
        created=now,
        submitted=time.time(),
        duration=state.task_time.seconds(chance.latency_z),
        outcome=outcome,
    )
    state.tasks.add(task)
    return task


async def _poll(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    number = state.next_poll()
    request_id = new_request_id()
    key = state.caller(request.headers.get("Authorization"))
    if isinstance(key, ApiError):
        return _error(state, key, request_id)
    now = time.monotonic()
    if not state.poll_quota.try_acquire(key, now):
        state.throttled += 1
        return _error(state, api_error("Throttling.RateQuota"), request_id)
    rule = state.plan.pick_poll(draw(state.base_seed, "poll", number).fault_u)
    if rule is not None:
        state.faults_injected[rule.kind] += 1
        if rule.error is not None:
            return _error(state, rule.error, request_id)
        return drop_connection(request, state)
    state.settle_tasks(now, time.time())
    task_id = request.match_info["task_id"]
    task = state.tasks.get(task_id, key)
    state.by_status["200"] += 1
    return json_response(200, task_body(task, task_id, now, request_id))


def task_body(task: Task | None, task_id: str, now: float, request_id: str) -> dict[str, Any]:
    """What ``GET /tasks/{id}`` answers for ``task`` at monotonic time ``now``."""
    if task is None:
        return {"request_id": request_id, "output": {"task_id": task_id, "task_status": "UNKNOWN"}}
    status = task.status(now)
    output: dict[str, Any] = {
        "task_id": task.id,
        "task_status": status.value,
        "submit_time": _stamp(task.submitted),
    }
    body: dict[str, Any] = {"request_id": request_id, "output": output}
    if status is TaskStatus.PENDING or status is TaskStatus.CANCELED:
        return body
    output["scheduled_time"] = _stamp(task.submitted + task.duration / 4)
    if status is TaskStatus.RUNNING:
        return body
    output["end_time"] = _stamp(task.ended_at or task.submitted + task.duration)
    n = task.request.n
    output["task_metrics"] = {"TOTAL": n, "SUCCEEDED": task.billed, "FAILED": n - task.billed}
    if status is TaskStatus.FAILED:
        output["code"] = "InternalError.Algo"
        output["message"] = "Inference error."
        return body
    output["results"] = task.results or []
    body["usage"] = {"image_count": task.billed}
    return body


def _stamp(wall: float) -> str:
    return datetime.fromtimestamp(wall).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


async def _cancel(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    request_id = new_request_id()
    key = state.caller(request.headers.get("Authorization"))
    if isinstance(key, ApiError):
        return _error(state, key, request_id)
    now = time.monotonic()
    state.settle_tasks(now, time.time())
    task = state.tasks.get(request.match_info["task_id"], key)
    if task is None:
        return _error(state, api_error("NotFound", "The task does not exist."), request_id)
    if not state.tasks.cancel(task, now):
        status = task.status(now).value
        message = f"Only a PENDING task can be canceled; this one is {status}."
        return _error(state, api_error("InvalidParameter", message), request_id)
    state.tasks_cancelled += 1
    state.by_status["200"] += 1
    return json_response(200, {"request_id": request_id})
