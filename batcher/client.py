"""The DashScope image API client: one request shape out, tolerant parsing in.

Two ways to get an image, after the model registry's ``protocol``: :meth:`DashScopeClient.generate`
(one synchronous call, z-image-turbo and Qwen-Image) and the task calls
(:meth:`~DashScopeClient.create_task`, :meth:`~DashScopeClient.poll_task`,
:meth:`~DashScopeClient.cancel_task`; Wan), answering the ``SyncApi`` and ``TaskApi``
protocols. Every request goes through one method, ``_send``, which is the one place where
aiohttp's exceptions become batcher's: every failure leaves here
as an :class:`~batcher.errors.ApiError` (the service answered with an error) or a
:class:`~batcher.errors.TransportError` (no usable answer), raised ``from`` the original.
Nothing here logs, and no exception text carries the request headers (the API key).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import aiohttp
import yarl

from .classify import TransportFault
from .errors import ApiError, ConfigError, TransportError

__all__ = [
    "REGIONS",
    "DashScopeClient",
    "ImageResult",
    "SyncApi",
    "TaskApi",
    "TaskCreated",
    "TaskReport",
    "base_url_for",
    "translate_exception",
]

REGIONS = {
    "intl": "https://dashscope-intl.aliyuncs.com/api/v1",  # Singapore
    "cn": "https://dashscope.aliyuncs.com/api/v1",  # Beijing
}
GENERATION_PATH = "/services/aigc/multimodal-generation/generation"
TASK_PATH = "/services/aigc/text2image/image-synthesis"
USER_AGENT = "batcher/0.1"
MAX_ERROR_BODY = 64 * 1024
CONNECT_TIMEOUT = 20.0  # seconds to open a connection to the API


def base_url_for(region: str, override: str | None = None) -> str:
    """The API base URL: ``override`` when given (it must end in ``/api/v1``), else the region's."""
    if override:
        url = override.rstrip("/")
        if not url.startswith(("http://", "https://")) or not url.endswith("/api/v1"):
            raise ConfigError(f"--base-url must be an http(s) URL ending in /api/v1, got {url!r}")
        return url
    try:
        return REGIONS[region]
    except KeyError:
        raise ConfigError(f"unknown region {region!r} (use intl or cn)") from None


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageResult:
    """What a successful generation returned: its (first) image.

    ``slot`` is the image's place (from 1) in the answer's list of results, failed ones
    included; ``more_urls`` are the URLs of further images of one synchronous answer (a call
    made with ``n > 1``), slots 2, 3, ..."""

    request_id: str | None
    image_url: str
    url_expires_at: float | None
    actual_prompt: str | None
    width: int | None
    height: int | None
    image_count: int | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    reasoning_tokens: int | None
    latency_ms: float
    slot: int = 1
    more_urls: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskCreated:
    """The service accepted a task."""

    task_id: str
    request_id: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskReport:
    """What a poll of a task said. ``status`` is the service's (``PENDING``, ``RUNNING``,
    ``SUCCEEDED``, ``FAILED``, ``CANCELED``, ``UNKNOWN``, ...). A ``SUCCEEDED`` task has its
    ``images``; the slots that failed in a partial success are in ``failed_slots`` as
    (code, message); a ``FAILED`` task has ``code`` and ``message``."""

    status: str
    images: tuple[ImageResult, ...] = ()
    failed_slots: tuple[tuple[str, str], ...] = ()
    image_count: int | None = None
    code: str | None = None
    message: str | None = None
    request_id: str | None = None

    @property
    def running(self) -> bool:
        """Still queued or running at the service."""
        return self.status in ("PENDING", "RUNNING", "SUSPENDED")


class SyncApi(Protocol):
    """A model called synchronously: one request, one image."""

    async def generate(
        self,
        *,
        model: str,
        prompt: str,
        size: str,
        seed: int | None,
        prompt_extend: bool,
        params: Mapping[str, object] | None = None,
        n: int = 1,
    ) -> ImageResult:
        """One call; raises ApiError or TransportError."""


class TaskApi(Protocol):
    """A model called as an asynchronous task: create, then poll."""

    async def create_task(
        self,
        *,
        model: str,
        prompt: str,
        size: str,
        seed: int | None,
        prompt_extend: bool,
        n: int,
        params: Mapping[str, object] | None = None,
    ) -> TaskCreated:
        """Create a task; raises ApiError or TransportError."""

    async def poll_task(self, task_id: str) -> TaskReport:
        """Read a task's status; raises ApiError or TransportError."""

    async def cancel_task(self, task_id: str) -> None:
        """Cancel a task still PENDING; raises ApiError or TransportError."""


def translate_exception(exc: BaseException) -> TransportError:
    """Map an aiohttp / asyncio / OS error raised during a call to a TransportError."""
    fault: TransportFault
    if isinstance(exc, aiohttp.ClientConnectorError):
        # refused, DNS, no route, TLS handshake: the request never left, so it was not billed
        reason = exc.os_error.strerror if exc.os_error.strerror else str(exc.os_error)
        return TransportError(TransportFault.CONNECT, f"{type(exc).__name__}: {reason}")
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        # the connection was never made within the connect timeout: not sent, not billed
        return TransportError(TransportFault.CONNECT, f"{type(exc).__name__}: connect timed out")
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        fault = TransportFault.TIMEOUT
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        fault = TransportFault.RESET
    elif isinstance(
        exc, (aiohttp.ClientPayloadError | aiohttp.ContentTypeError, aiohttp.ClientResponseError)
    ):
        fault = TransportFault.BAD_RESPONSE
    elif isinstance(exc, aiohttp.ClientError | OSError):
        fault = TransportFault.RESET
    else:
        raise TypeError(f"not a transport error: {type(exc).__name__}") from exc
    return TransportError(fault, type(exc).__name__)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def url_expiry(url: str) -> float | None:
    """The ``Expires`` unix time of a signed storage URL, when it carries one."""
    try:
        values = parse_qs(urlsplit(url).query).get("Expires")
        return float(values[0]) if values else None
    except (ValueError, IndexError):
        return None


def parse_success(body: Any, latency_ms: float) -> ImageResult:
    """Read a 200 body liberally: unknown fields ignored, optional ones may be missing."""
    if not isinstance(body, dict):
        raise TransportError(TransportFault.BAD_RESPONSE, "the answer is not a JSON object")
    output = _dict(body.get("output"))
    choices = _list(output.get("choices"))
    image_url: str | None = None
    text: str | None = None
    more: list[str] = []
    for choice in choices:
        message = _dict(_dict(choice).get("message"))
        for item in _list(message.get("content")):
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("image"), str):
                if image_url is None:
                    image_url = item["image"]
                else:
                    more.append(item["image"])
            if text is None and isinstance(item.get("text"), str):
                text = item["text"]
    if image_url is None:
        # An async-style body (results[].url) is accepted too: be liberal in what we accept.
        for result in _list(output.get("results")):
            if isinstance(result, dict) and isinstance(result.get("url"), str):
                image_url = result["url"]
                text = text or result.get("actual_prompt")
                break
    if image_url is None:
        raise TransportError(TransportFault.BAD_RESPONSE, "the answer carries no image URL")
    usage = _dict(body.get("usage"))
    reasoning = _int(_dict(usage.get("output_tokens_details")).get("reasoning_tokens"))
    request_id = body.get("request_id")
    return ImageResult(
        request_id=request_id if isinstance(request_id, str) else None,
        image_url=image_url,
        url_expires_at=url_expiry(image_url),
        actual_prompt=text,
        width=_int(usage.get("width")),
        height=_int(usage.get("height")),
        image_count=_int(usage.get("image_count")),
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        total_tokens=_int(usage.get("total_tokens")),
        reasoning_tokens=reasoning,
        latency_ms=latency_ms,
        more_urls=tuple(more),
    )


def parse_task(body: Any, latency_ms: float) -> TaskReport:
    """Read a poll's 200 body liberally (unknown fields ignored)."""
    if not isinstance(body, dict):
        raise TransportError(TransportFault.BAD_RESPONSE, "the answer is not a JSON object")
    output = _dict(body.get("output"))
    status = output.get("task_status")
    if not isinstance(status, str):
        raise TransportError(TransportFault.BAD_RESPONSE, "the answer carries no task_status")
    rid = body.get("request_id")
    request_id = rid if isinstance(rid, str) else None
    usage = _dict(body.get("usage"))
    images: list[ImageResult] = []
    failed: list[tuple[str, str]] = []
    for slot, item in enumerate(_list(output.get("results")), start=1):
        result = _dict(item)
        url = result.get("url")
        if isinstance(url, str) and url:
            actual = result.get("actual_prompt")
            images.append(
                ImageResult(
                    request_id=request_id,
                    image_url=url,
                    url_expires_at=url_expiry(url),
                    actual_prompt=actual if isinstance(actual, str) else None,
                    width=None,
                    height=None,
                    image_count=1,
                    input_tokens=None,
                    output_tokens=None,
                    total_tokens=None,
                    reasoning_tokens=None,
                    latency_ms=latency_ms,
                    slot=slot,
                )
            )
        else:
            code, message = result.get("code"), result.get("message")
            failed.append(
                (
                    code if isinstance(code, str) else "Unknown",
                    message if isinstance(message, str) else "",
                )
            )
    code, message = output.get("code"), output.get("message")
    return TaskReport(
        status=status.upper(),
        images=tuple(images),
        failed_slots=tuple(failed),
        image_count=_int(usage.get("image_count")),
        code=code if isinstance(code, str) else None,
        message=message if isinstance(message, str) else None,
        request_id=request_id,
    )


def parse_error(status: int, raw: bytes, retry_after: str | None) -> ApiError:
    """An error answer: the JSON envelope when there is one, plain text otherwise."""
    code = message = request_id = None
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("code") if isinstance(body.get("code"), str) else None
        msg = body.get("message", body.get("msg"))
        message = msg if isinstance(msg, str) else None
        rid = body.get("request_id")
        request_id = rid if isinstance(rid, str) else None
    else:
        text = raw[:300].decode("utf-8", "replace").strip()
        message = text or None
    return ApiError(
        status=status, code=code, message=message, request_id=request_id, retry_after=retry_after
    )


class DashScopeClient:
    """Calls the image API: ``SyncApi`` and ``TaskApi`` over one aiohttp session.

    >>> client = DashScopeClient(session, base_url=REGIONS["intl"], api_key=key)  # doctest: +SKIP
    >>> result = await client.generate(model="z-image-turbo", prompt="a red chair",
    ...                                size="1024*1536", seed=7, prompt_extend=False)
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        request_timeout: float = 120.0,
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._url = yarl.URL(self.base_url + GENERATION_PATH)  # parsed once, not per call
        self._task_url = yarl.URL(self.base_url + TASK_PATH)
        self._tasks_url = yarl.URL(self.base_url + "/tasks")
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._async_headers = {**self._headers, "X-DashScope-Async": "enable"}
        # A connect that hangs (no route, a dropped SYN) is cut short on its own: it is a sign
        # of an unreachable service, not a slow answer that may have been billed.
        self._timeout = aiohttp.ClientTimeout(
            total=request_timeout, sock_connect=min(CONNECT_TIMEOUT, request_timeout)
        )
        # A server (or a proxy) may echo the key back in an error; errors.py masks what looks
        # like a key, this catches the exact key whatever its shape, in every field.
        self._secret = api_key.strip().encode() if len(api_key.strip()) >= 8 else b""

    def _scrub(self, data: bytes) -> bytes:
        return data.replace(self._secret, b"***") if self._secret else data

    @property
    def endpoint(self) -> str:
        """``host:port`` of the API, for messages (never the key)."""
        return f"{self._url.host}:{self._url.port}"

    def __repr__(self) -> str:  # never show the headers
        return f"DashScopeClient({str(self._url)!r})"

    async def generate(
        self,
        *,
        model: str,
        prompt: str,
        size: str,
        seed: int | None,
        prompt_extend: bool,
        params: Mapping[str, object] | None = None,
        n: int = 1,
    ) -> ImageResult:
        """One synchronous text-to-image call. Raises ApiError or TransportError.

        ``params`` are the job's optional model parameters (``negative_prompt``,
        ``watermark``), sent in ``parameters``; ``n`` is sent only when it is not 1 (a model
        of one image a call may refuse the field itself).
        """
        parameters: dict[str, Any] = {"size": size, "prompt_extend": prompt_extend}
        if n != 1:
            parameters["n"] = n
        if seed is not None:
            parameters["seed"] = seed
        parameters.update(params or {})
        payload = {
            "model": model,
            "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]},
            "parameters": parameters,
        }
        body, latency_ms = await self._send("POST", self._url, payload)
        return parse_success(body, latency_ms)

    async def create_task(
        self,
        *,
        model: str,
        prompt: str,
        size: str,
        seed: int | None,
        prompt_extend: bool,
        n: int,
        params: Mapping[str, object] | None = None,
    ) -> TaskCreated:
        """Create an asynchronous task (``X-DashScope-Async: enable``); ``n`` is always sent
        (the service's own default is 4). Raises ApiError or TransportError."""
        extra = dict(params or {})
        inputs: dict[str, Any] = {"prompt": prompt}
        negative = extra.pop("negative_prompt", None)
        if negative is not None:
            inputs["negative_prompt"] = negative
        parameters: dict[str, Any] = {"size": size, "n": n, "prompt_extend": prompt_extend}
        if seed is not None:
            parameters["seed"] = seed
        parameters.update(extra)
        payload = {"model": model, "input": inputs, "parameters": parameters}
        body, _ = await self._send("POST", self._task_url, payload, asynchronous=True)
        output = _dict(_dict(body).get("output"))
        task_id = output.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise TransportError(TransportFault.BAD_RESPONSE, "the answer carries no task_id")
        rid = _dict(body).get("request_id")
        return TaskCreated(task_id=task_id, request_id=rid if isinstance(rid, str) else None)

    async def poll_task(self, task_id: str) -> TaskReport:
        """``GET /tasks/{task_id}``. Raises ApiError or TransportError."""
        body, latency_ms = await self._send("GET", self._tasks_url / task_id, None)
        return parse_task(body, latency_ms)

    async def cancel_task(self, task_id: str) -> None:
        """``POST /tasks/{task_id}/cancel`` (a task still PENDING). Raises ApiError or
        TransportError."""
        await self._send("POST", self._tasks_url / task_id / "cancel", None)

    async def _send(
        self, method: str, url: yarl.URL, payload: Any, *, asynchronous: bool = False
    ) -> tuple[Any, float]:
        """One request; its JSON body and latency. Every aiohttp error is mapped here."""
        headers = self._async_headers if asynchronous else self._headers
        started = time.perf_counter()
        try:
            async with self._session.request(
                method, url, json=payload, headers=headers, timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    raw = await resp.content.read(MAX_ERROR_BODY)
                    retry_after = resp.headers.get("Retry-After")
                    if retry_after is not None:
                        retry_after = self._scrub(retry_after.encode()).decode()
                    raise parse_error(resp.status, self._scrub(raw), retry_after)
                raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise translate_exception(exc) from exc
        latency_ms = (time.perf_counter() - started) * 1000.0
        try:
            return json.loads(raw), latency_ms
        except ValueError as exc:
            raise TransportError(TransportFault.BAD_RESPONSE, "the answer is not JSON") from exc
