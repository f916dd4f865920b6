"""``batcher cancel DIR``: cancel the run folder's tasks that the service has not started.

A job of an asynchronous model whose task was created is ``submitted``, with its ``task_id``.
Ctrl-C never cancels such a task (the next run polls it and keeps its image); this command
does, for the tasks still ``PENDING`` at the service: each one is cancelled
(``POST /tasks/{id}/cancel``) and its job recorded ``failed`` with code ``TaskCanceled``
(``batcher retry DIR --code TaskCanceled`` puts them back). A task already running cannot be
cancelled: it is left, and the next run collects its image.

A task belongs to the account that created it: with ``--lanes``, each task is cancelled with
the key of the lane its job records (a task of a lane the file does not name is counted as
not reached); without, with ``DASHSCOPE_API_KEY``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from jobs import JobStore

from .client import DashScopeClient, base_url_for
from .errors import ApiError, ConfigError, TransportError
from .lanes import DEFAULT_LANE, lane_keys, load_lanes
from .layout import RunLayout, RunLock

__all__ = ["CancelReport", "cancel_pending_tasks"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelReport:
    """What ``batcher cancel`` did: tasks cancelled, already running, and unreachable."""

    cancelled: int
    running: int
    errors: int


async def cancel_pending_tasks(
    folder: Path,
    *,
    region: str,
    base_url: str | None,
    request_timeout: float = 30.0,
    database: str | None = None,
    lanes: Path | None = None,
) -> CancelReport:
    """Cancel every submitted task of ``folder`` (or of the run's table in ``database``, a
    PostgreSQL URL) still PENDING at the service, each with its lane's key (``lanes``, a
    lanes file) or ``DASHSCOPE_API_KEY``."""
    layout = RunLayout.locate(folder, database)
    if not layout.has_store():
        raise layout.no_store()
    endpoints: dict[str | None, tuple[str, str]] = {}  # lane -> (base URL, key)
    if lanes is not None:
        found = load_lanes(lanes)
        keys = lane_keys(found)
        for lane in found:
            endpoints[lane.name] = (base_url_for(lane.region, lane.base_url), keys[lane.name])
    else:
        url = base_url_for(region, base_url)
        key = os.environ.get("DASHSCOPE_API_KEY", "").strip()
        if not key:
            raise ConfigError("DASHSCOPE_API_KEY is not set; export your Model Studio key")
        endpoints[None] = endpoints[DEFAULT_LANE] = (url, key)
    cancelled = running = errors = 0
    # A shared table's workers may be running: the folder's lock is not theirs to take (a
    # submitted job a worker is polling is cancelled all the same; its poll then sees it).
    with contextlib.nullcontext() if layout.shared else RunLock(layout.lock):
        async with await JobStore.open(layout.store, create=False) as store:
            tasks = await store.submitted_tasks()
            async with aiohttp.ClientSession() as session:
                clients = {
                    lane: DashScopeClient(
                        session, base_url=url, api_key=key, request_timeout=request_timeout
                    )
                    for lane, (url, key) in endpoints.items()
                }
                for job_id, task_id, _model in tasks:
                    record = await store.get(job_id) or {}
                    client = clients.get(record.get("lane"))
                    if client is None:  # created on a lane not given: its key is not known
                        errors += 1
                        continue
                    try:
                        await client.cancel_task(task_id)
                    except ApiError as err:
                        # 400: not PENDING any more (running or ended); the next run collects it
                        if err.status == 400:
                            running += 1
                        else:
                            errors += 1
                        continue
                    except TransportError:
                        errors += 1
                        continue
                    message = f"task {task_id} cancelled by batcher cancel"
                    if await store.cancel_submitted(job_id, code="TaskCanceled", message=message):
                        cancelled += 1
    return CancelReport(cancelled=cancelled, running=running, errors=errors)
