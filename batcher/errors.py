"""Exceptions of batcher.

The tree::

    BatcherError             anything batcher fails at
    ├── TransientError       a failure worth retrying later
    ├── PermanentJobError    this job cannot succeed as it stands
    ├── RunAborted           no job can succeed: the run stops (bad key, arrears, ...)
    ├── ApiError             the API answered with an error (status, code, message, request_id)
    ├── TransportError       no usable HTTP answer (connect, send, reset, timeout, bad response)
    ├── DownloadError        an image could not be downloaded, or failed verification
    └── ConfigError          bad command-line options or environment
        └── LanesInvalid     a bad lanes file (one located line: file:line: field: message)

The three families name what the run does; the concrete leaves name what happened and carry a
``classification`` (or ``verdict``) from :mod:`batcher.classify` that maps them to a family.
Each class's docstring is its default message. Exception text never holds request headers or
the API key: messages are reduced to one line and anything key-like is masked.

>>> str(ApiError(status=401, code="InvalidApiKey", message="Invalid API-key provided."))
'HTTP 401 InvalidApiKey: Invalid API-key provided.'
"""

from __future__ import annotations

import re

from batcher.classify import (
    Classification,
    DownloadVerdict,
    TransportFault,
    classify_api_error,
    classify_download,
    classify_transport,
)
from jobs.errors import rebuild_error

__all__ = [
    "ApiError",
    "BatcherError",
    "ConfigError",
    "DownloadError",
    "LanesInvalid",
    "PermanentJobError",
    "RunAborted",
    "TransientError",
    "TransportError",
]

# API keys, bearer tokens, and the credentials of a signed storage URL's query string.
_SECRET = re.compile(
    r"(?i)\bsk-[\w-]{4,}|\bbearer\s+\S+|(?<=signature=)[^&\s]+|(?<=accesskeyid=)[^&\s]+"
)
_MAX_TEXT = 300


def _mask(text: str) -> str:
    """``text`` with key-like tokens (``sk-...``, ``Bearer ...``, ``Signature=...``) masked."""
    return _SECRET.sub("***", text)


def _safe(text: str) -> str:
    """One masked line of at most ``_MAX_TEXT`` characters."""
    line = _mask(" ".join(text.split()))
    return line if len(line) <= _MAX_TEXT else line[: _MAX_TEXT - 3] + "..."


class BatcherError(Exception):
    """batcher failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(_safe(message or (type(self).__doc__ or "").strip()))

    def __reduce__(self) -> tuple[object, ...]:
        # Subclasses take keyword or typed arguments, so rebuild without calling __init__.
        return (rebuild_error, (type(self), self.args, self.__dict__))


class TransientError(BatcherError):
    """A temporary failure; the job will be tried again."""


class PermanentJobError(BatcherError):
    """The job cannot succeed as it stands."""


class RunAborted(BatcherError):
    """The run was stopped: no job can succeed until the cause is fixed."""

    def __init__(self, message: str | None = None, *, advice: str | None = None) -> None:
        self.advice = advice
        text = message or (self.__doc__ or "").strip()
        super().__init__(f"{text.rstrip('.')}; {advice}" if advice else text)


class ApiError(BatcherError):
    """The API answered with an error."""

    def __init__(
        self,
        *,
        status: int,
        code: str | None = None,
        message: str | None = None,
        request_id: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.classification: Classification = classify_api_error(status, code, message)
        self.message = None if message is None else _mask(message)  # stored and shown: masked
        self.request_id = request_id
        self.retry_after = retry_after  # the raw header value; see backoff.parse_retry_after
        text = f"HTTP {status} {code or 'error'}: {message or (self.__doc__ or '').strip()}"
        super().__init__(f"{text} (request_id {request_id})" if request_id else text)


class TransportError(BatcherError):
    """No usable answer came from the API."""

    def __init__(self, fault: TransportFault, detail: str | None = None) -> None:
        self.fault = fault
        self.detail = None if detail is None else _mask(detail)
        self.classification: Classification = classify_transport(fault)
        suffix = f" [{detail}]" if detail else ""
        super().__init__(f"{fault.value}: {self.classification.advice}{suffix}")


class DownloadError(BatcherError):
    """The image could not be downloaded."""

    def __init__(
        self, reason: str, *, status: int | None = None, detail: str | None = None
    ) -> None:
        # reason: "truncated", "corrupt", "too_large", "size_mismatch", "expired", "http_403", ...
        self.reason = reason
        self.status = status
        self.detail = None if detail is None else _mask(detail)
        self.verdict: DownloadVerdict = classify_download(status, expired=reason == "expired")
        suffix = f": {detail}" if detail else ""
        super().__init__(f"image download failed ({reason}){suffix}")


class ConfigError(BatcherError):
    """The configuration is invalid."""


class LanesInvalid(ConfigError):
    """The lanes file is invalid; nothing was run."""
