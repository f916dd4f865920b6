"""Asynchronous tasks (Wan text-to-image): the request check and the lifecycle, pure.

A task is created by ``POST .../text2image/image-synthesis`` and then only ever read. Its whole
life is decided when it is created: it takes ``duration`` seconds (drawn from ``task_seconds``),
is ``PENDING`` for the first quarter of that and ``RUNNING`` for the rest, then ends as its
``outcome`` says (``SUCCEEDED``, ``FAILED``, or ``SUCCEEDED`` with its last image failed). A
task still ``PENDING`` may be ``CANCELED``. After ``task_ttl`` seconds it is forgotten and
reads as ``UNKNOWN``, as an unknown id or another key's task does.

:class:`TaskBook` keeps the tasks, counts the unfinished ones per (key, model) for the
concurrent-task limit, and hands out the tasks that have just ended (:meth:`TaskBook.ended`)
so that the caller bills them and issues their image URLs exactly once. No I/O; the clock is
passed in.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from batcher.emulator.codes import ApiError, api_error
from batcher.emulator.validate import GenerationRequest, check_common_parameters
from batcher.models import MODELS, ApiProtocol

__all__ = ["Outcome", "Task", "TaskBook", "TaskStatus", "validate_task_payload"]


class TaskStatus(StrEnum):
    """What ``GET /tasks/{id}`` reports."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    UNKNOWN = "UNKNOWN"


class Outcome(StrEnum):
    """How a task that runs to its end ends."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the whole task
    PARTIAL = "partial"  # its last image failed (n > 1), the others succeeded


def validate_task_payload(payload: Any) -> GenerationRequest | ApiError:
    """Check a task creation body: ``model`` an asynchronous model of the registry,
    ``input.prompt`` (cut to the model's limit), ``input.negative_prompt``, and
    ``parameters`` (``n`` 1..the model's maximum, default the service's, 4)."""
    if not isinstance(payload, dict):
        return api_error("BadRequest.IllegalInput", "The request body must be a JSON object.")
    name = payload.get("model")
    if not isinstance(name, str) or not name:
        return api_error("BadRequest.EmptyModel")
    model = MODELS.get(name)
    if model is None or model.protocol is not ApiProtocol.TASK:
        return api_error("InvalidParameter", "Model not exist.")
    inputs = payload.get("input")
    if not isinstance(inputs, dict):
        return api_error("BadRequest.EmptyInput")
    prompt = inputs.get("prompt")
    if not isinstance(prompt, str):
        return api_error("InvalidParameter", "Field required: input.prompt")
    if not prompt.strip():
        return api_error("InvalidParameter", "The prompt must not be empty.")
    params = payload.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        return api_error("InvalidParameter", "parameters must be a JSON object")
    n = params.get("n", model.n_api_default)
    if isinstance(n, bool) or not isinstance(n, int) or not model.n_min <= n <= model.n_max:
        return api_error("InvalidParameter", f"n must be an integer in [1, {model.n_max}]")
    return check_common_parameters(model, prompt, inputs.get("negative_prompt"), params, n)


@dataclass(kw_only=True, slots=True)
class Task:
    """One task. Times are on the monotonic clock; ``submitted`` is wall-clock time."""

    id: str
    key: str
    request: GenerationRequest
    seed: int  # the first image's seed (the request's, or drawn)
    host: str  # where its image URLs point
    created: float
    submitted: float
    duration: float
    outcome: Outcome
    canceled: bool = False
    results: list[dict[str, Any]] | None = None  # set once it ended
    billed: int = 0
    ended_at: float | None = None  # wall-clock time it ended

    @property
    def finish(self) -> float:
        return self.created + self.duration

    def status(self, now: float) -> TaskStatus:
        """The status at monotonic time ``now``."""
        if self.canceled:
            return TaskStatus.CANCELED
        if now < self.created + self.duration / 4:
            return TaskStatus.PENDING
        if now < self.finish:
            return TaskStatus.RUNNING
        return TaskStatus.FAILED if self.outcome is Outcome.FAILED else TaskStatus.SUCCEEDED


@dataclass(slots=True)
class TaskBook:
    """The tasks of one emulator: lookup, the concurrent count, ends and expiry."""

    ttl: float
    tasks: dict[str, Task] = field(default_factory=dict)
    _ends: list[tuple[float, str]] = field(default_factory=list)  # heap of (finish, id)
    _order: deque[str] = field(default_factory=deque)  # ids by creation, for expiry
    _open: dict[tuple[str, str], set[str]] = field(default_factory=dict)

    def add(self, task: Task) -> None:
        """Record a new task."""
        self.tasks[task.id] = task
        heapq.heappush(self._ends, (task.finish, task.id))
        self._order.append(task.id)
        self._open.setdefault((task.key, task.request.model), set()).add(task.id)

    def unfinished(self, key: str, model: str) -> int:
        """Tasks of ``key`` and ``model`` neither ended nor cancelled (after :meth:`ended`)."""
        return len(self._open.get((key, model), ()))

    def ended(self, now: float) -> list[Task]:
        """The tasks that ended since the last call (not cancelled ones), oldest first; and
        forget the tasks older than ``ttl``."""
        done: list[Task] = []
        while self._ends and self._ends[0][0] <= now:
            _, task_id = heapq.heappop(self._ends)
            task = self.tasks.get(task_id)
            if task is None or task.canceled:
                continue
            self._close(task)
            done.append(task)
        while self._order and (
            self._order[0] not in self.tasks or self.tasks[self._order[0]].created + self.ttl <= now
        ):
            task = self.tasks.pop(self._order.popleft(), None)
            if task is not None:
                self._close(task)
        return done

    def get(self, task_id: str, key: str) -> Task | None:
        """Task ``task_id`` if ``key`` owns it and it is not forgotten."""
        task = self.tasks.get(task_id)
        return task if task is not None and task.key == key else None

    def cancel(self, task: Task, now: float) -> bool:
        """Cancel ``task`` if it is still PENDING; whether it was."""
        if task.status(now) is not TaskStatus.PENDING:
            return False
        task.canceled = True
        self._close(task)
        return True

    def _close(self, task: Task) -> None:
        ids = self._open.get((task.key, task.request.model))
        if ids is not None:
            ids.discard(task.id)
