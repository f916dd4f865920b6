"""What a running emulator remembers: settings, counters, the quota and the issued images.

One :class:`EmulatorState` belongs to one aiohttp application and is only touched from its event
loop (the thread-safe wrappers in :mod:`batcher.emulator.server` hop onto that loop).

Memory stays bounded by design: images are kept as their request parameters only (the PNG is
drawn at download time) and at most ``max_images`` of them, oldest forgotten first (their URLs
then answer 404 ``NoSuchKey``, as a deleted OSS object would). The one thing that grows with the
number of billed images is the set of 64-bit billing keys behind ``duplicate_billed``: about
70 bytes an image, 70 MB after a million images.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import secrets
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from batcher.emulator.codes import ApiError, api_error
from batcher.emulator.config import EmulatorConfig, FaultPlan, Latency
from batcher.emulator.faults import SlidingWindowQuota
from batcher.emulator.tasks import TaskBook
from batcher.emulator.urls import UrlSigner, image_path
from batcher.emulator.validate import GenerationRequest, check_api_key
from batcher.models import MODELS

TASK_POLL_RPS = 20.0  # the task query endpoint's documented default limit, per key

__all__ = ["EmulatorState", "StoredImage"]


@dataclass(frozen=True, kw_only=True, slots=True)
class StoredImage:
    """What it takes to draw an issued image again."""

    text: str
    seed: int
    width: int
    height: int


class EmulatorState:
    """Settings, counters, quota windows and issued images of one emulator."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.base_seed = config.seed if config.seed is not None else secrets.randbits(62)
        self.signer = UrlSigner(
            secret=secrets.token_bytes(32),
            access_key_id="LTAI5tEmu" + secrets.token_hex(8).upper()[:15],
        )
        self.quota = SlidingWindowQuota(config.rps)  # z-image-turbo's
        self.model_quotas = {name: SlidingWindowQuota(m.quota.rps) for name, m in MODELS.items()}
        self.poll_quota = SlidingWindowQuota(TASK_POLL_RPS)
        self.tasks = TaskBook(ttl=config.task_ttl)
        self._key_accounts = {
            key: name for name, keys in config.accounts.items() for key in keys
        }  # accounts are fixed for the emulator's life (not reconfigurable)
        self._account_quotas = {
            (f"account:{name}", model): SlidingWindowQuota(rate)
            for name, rates in config.account_rps.items()
            for model, rate in rates.items()
        }
        self._task_count = 0
        self._poll_count = 0
        self.tasks_cancelled = 0
        self.images_billed_by_model: Counter[str] = Counter()
        # model -> [first, last accepted request (monotonic s), requests accepted]
        self.accepted_by_model: dict[str, list[float]] = {}
        self.closing = asyncio.Event()
        self._apply(config)
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._billed: set[int] = set()
        self._generation_count = 0
        self._download_count = 0
        self.images_billed = 0
        self.images_billed_prompt_extend = 0
        self.duplicate_billed = 0
        self.throttled = 0
        self.connections_dropped = 0
        self.latency_seconds_total = 0.0
        self.by_status: Counter[str] = Counter()
        self.download_by_status: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()

    def _apply(self, config: EmulatorConfig) -> None:
        self.config = config
        self.plan: FaultPlan = config.fault_plan
        self.latency: Latency = config.latency_model
        self.task_time: Latency = config.task_time
        self.quota.set_rate(config.rps)
        for name, quota in self.model_quotas.items():
            if quota is self.quota:
                continue
            quota.set_rate(math.inf if math.isinf(config.rps) else MODELS[name].quota.rps)
        self.model_quotas["z-image-turbo"] = self.quota
        self.tasks.ttl = config.task_ttl

    def reconfigure(self, **changes: Any) -> EmulatorConfig:
        """Change the run-time settings (see ``EmulatorConfig.with_changes``); returns the new."""
        self._apply(self.config.with_changes(**changes))
        return self.config

    def next_generation(self) -> int:
        """Count a generation request; its number (from 0) keys its seeded draws."""
        number = self._generation_count
        self._generation_count += 1
        return number

    def next_task(self) -> int:
        """Count a created task; its number (from 0) keys its seeded draws."""
        number = self._task_count
        self._task_count += 1
        return number

    def next_poll(self) -> int:
        """Count a task poll; its number (from 0) keys its seeded draws."""
        number = self._poll_count
        self._poll_count += 1
        return number

    def caller(self, authorization: str | None) -> str | ApiError:
        """Who calls: the account of the ``Authorization`` header's key (its keys share a
        quota and their tasks), or the key itself without accounts; or 401 ``InvalidApiKey``."""
        config = self.config
        if not config.accounts:
            return check_api_key(authorization, config.api_key)
        key = check_api_key(authorization, None)
        if isinstance(key, ApiError):
            return key
        if config.api_key is not None and hmac.compare_digest(key, config.api_key):
            return key
        account = self._key_accounts.get(key)
        return f"account:{account}" if account is not None else api_error("InvalidApiKey")

    def try_quota(self, key: str, model: str, now: float) -> bool:
        """Accept one request of ``key`` (a caller: see :meth:`caller`) for ``model`` under
        that model's quota (the account's own, if it has one), or refuse."""
        quota = self._account_quotas.get((key, model), self.model_quotas[model])
        if not quota.try_acquire(key, now):
            return False
        window = self.accepted_by_model.setdefault(model, [now, now, 0])
        window[1] = now
        window[2] += 1
        return True

    def next_download(self) -> int:
        """Count an image download; its number (from 0) keys its seeded draws."""
        number = self._download_count
        self._download_count += 1
        return number

    def bill(self, request: GenerationRequest, seed: int | None) -> None:
        """Count one billed image; note a duplicate of one billed before.

        A duplicate has the same model, prompt, size and seed as sent (an omitted seed counts
        as its own value, so a retried seedless request is caught too).
        """
        self.images_billed += 1
        self.images_billed_by_model[request.model] += 1
        if request.prompt_extend:
            self.images_billed_prompt_extend += 1
        key = hash((request.model, request.prompt, request.width, request.height, seed))
        if key in self._billed:
            self.duplicate_billed += 1
        else:
            self._billed.add(key)

    def settle_tasks(self, now: float, wall: float) -> None:
        """Finish the tasks that ended by monotonic time ``now``: issue their image URLs
        (signed, valid ``url_ttl``) and bill their successful images, once each."""
        for task in self.tasks.ended(now):
            request = task.request
            results: list[dict[str, Any]] = []
            for slot in range(request.n):
                if task.outcome.value == "partial" and slot == request.n - 1 and request.n > 1:
                    results.append({"code": "InternalError.Algo", "message": "Inference error."})
                    continue
                if task.outcome.value == "failed":
                    break
                seed = task.seed + slot
                image_id = str(uuid.uuid4())
                path = image_path(image_id, wall)
                expires = int(wall + self.config.url_ttl)
                url = f"http://{task.host}{path}?{self.signer.query(path, expires)}"
                result = {"orig_prompt": request.prompt, "url": url}
                if request.prompt_extend:
                    result["actual_prompt"] = request.prompt + ", highly detailed"
                results.append(result)
                self.store_image(
                    image_id,
                    StoredImage(
                        text=request.prompt, seed=seed, width=request.width, height=request.height
                    ),
                )
                self.bill(request, seed)
                task.billed += 1
            task.results = results
            task.ended_at = wall

    def store_image(self, image_id: str, image: StoredImage) -> None:
        """Remember an issued image, forgetting the oldest beyond ``max_images``."""
        self._images[image_id] = image
        while len(self._images) > self.config.max_images:
            self._images.popitem(last=False)

    def image(self, image_id: str) -> StoredImage | None:
        """The issued image ``image_id``, or None if unknown or forgotten."""
        return self._images.get(image_id)

    def stats(self) -> dict[str, Any]:
        """The counters, as ``GET /_emulator/stats`` returns them.

        ``generate_requests`` every generation POST; ``images_billed`` successful generations
        (``lost`` ones included; ``images_billed_prompt_extend`` of them at the double price);
        ``duplicate_billed`` billed images whose model, prompt, size and seed were billed before;
        ``downloads`` image GETs; ``by_status`` / ``download_by_status`` HTTP statuses sent (a
        dropped connection sends none); ``throttled`` quota refusals; ``faults_injected`` by kind;
        ``connections_dropped``; ``latency_seconds_total`` the generation latencies drawn;
        ``images_stored`` downloadable images; ``seed`` the base seed of
        the draws (pass it as ``seed`` to replay a run). Tasks: ``tasks_created`` creations
        accepted (a ``lost`` one included), ``task_polls`` every ``GET /tasks/{id}``,
        ``tasks_cancelled``, ``tasks_open`` not yet ended; ``images_billed_by_model``;
        ``accepted_by_model``: requests (calls and task creates) each model's quota accepted,
        with the monotonic times of the first and last.
        """
        self.settle_tasks(time.monotonic(), time.time())
        return {
            "generate_requests": self._generation_count,
            "images_billed": self.images_billed,
            "images_billed_prompt_extend": self.images_billed_prompt_extend,
            "duplicate_billed": self.duplicate_billed,
            "downloads": self._download_count,
            "by_status": dict(self.by_status),
            "download_by_status": dict(self.download_by_status),
            "throttled": self.throttled,
            "faults_injected": dict(self.faults_injected),
            "connections_dropped": self.connections_dropped,
            "latency_seconds_total": self.latency_seconds_total,
            "images_stored": len(self._images),
            "seed": self.base_seed,
            "tasks_created": self._task_count,
            "task_polls": self._poll_count,
            "tasks_cancelled": self.tasks_cancelled,
            "tasks_open": sum(
                1 for t in self.tasks.tasks.values() if t.results is None and not t.canceled
            ),
            "images_billed_by_model": dict(self.images_billed_by_model),
            "accepted_by_model": {
                model: {"requests": int(n), "first": first, "last": last}
                for model, (first, last, n) in sorted(self.accepted_by_model.items())
            },
        }
