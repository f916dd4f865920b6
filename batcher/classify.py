"""What a failed call means: retry it, slow down, fail the job, or stop the run.

Pure and table-driven (STYLE.md convention 5): no I/O, no clock, no aiohttp. The client turns
an HTTP answer or a transport problem into plain values; these functions turn those values into
a :class:`Classification`, and the pool carries it out.

The order of the decision for an API error:

1. a few codes whose meaning depends on the message (``_MESSAGE_RULES``), e.g. the 429
   ``Throttling.AllocationQuota`` that says "Free allocated quota exceeded" (the free quota is
   gone, every job would fail) versus the same code as a plain rate limit;
2. the code itself (``_BY_CODE``, exact spelling first, then case-insensitively), and families
   by prefix (``_BY_PREFIX``, e.g. any ``AccessDenied.*``);
3. the HTTP status (``_BY_STATUS``), then its class (4xx fail the job, 5xx retry).

Every error code the service documents has a row (the README lists them by verdict).

>>> classify_api_error(401, "InvalidApiKey", "Invalid API-key provided.").verdict
<Verdict.ABORT_RUN: 'abort_run'>
>>> classify_transport(TransportFault.TIMEOUT).ambiguous
True
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "Classification",
    "DownloadVerdict",
    "TransportFault",
    "Verdict",
    "classify_api_error",
    "classify_download",
    "classify_transport",
]


class Verdict(StrEnum):
    """What the pool does with a failed generation call."""

    RETRY = "retry"  # back off and try again; uses up one of the job's attempts
    THROTTLED = "throttled"  # over the quota: tell the pacer, retry, do not use up an attempt
    FAIL_JOB = "fail_job"  # this job cannot succeed as it stands: mark it failed at once
    ABORT_RUN = "abort_run"  # no job can succeed: stop claiming, exit 3 with the advice


class TransportFault(StrEnum):
    """What the client saw when there was no usable HTTP answer."""

    CONNECT = "connect"  # never reached the server: surely not billed
    SEND = "send"  # failed while sending the request: not billed
    RESET = "reset"  # connection dropped after the request was sent: maybe billed
    TIMEOUT = "timeout"  # no answer within the request timeout: maybe billed
    BAD_RESPONSE = "bad_response"  # an answer that is not a valid JSON envelope: maybe billed


class DownloadVerdict(StrEnum):
    """What to do when downloading a generated image failed."""

    RETRY_DOWNLOAD = "retry_download"  # the URL is still good: download again, do not pay again
    REGENERATE = "regenerate"  # the URL is dead (expired, 403, 404): generate the image again


@dataclass(frozen=True, kw_only=True, slots=True)
class Classification:
    """The meaning of one failed call.

    ``ambiguous`` is true when the request may have been billed although no result came back
    (it reached the server and the answer was lost). ``advice`` is one short sentence for the
    user; it is what a run-level stop prints after the cause.

    >>> Classification(verdict=Verdict.RETRY, ambiguous=False, advice="try again later").verdict
    <Verdict.RETRY: 'retry'>
    """

    verdict: Verdict
    ambiguous: bool
    advice: str


def _c(verdict: Verdict, advice: str, *, ambiguous: bool = False) -> Classification:
    return Classification(verdict=verdict, ambiguous=ambiguous, advice=advice)


_R, _T, _F, _A = Verdict.RETRY, Verdict.THROTTLED, Verdict.FAIL_JOB, Verdict.ABORT_RUN

# Advice shared by several codes.
_KEY = _c(_A, "check DASHSCOPE_API_KEY and that it belongs to the region (--region)")
_RIGHTS = _c(_A, "grant the key's workspace access to this model in the Model Studio console")
_BILLING = _c(_A, "top up or settle the Alibaba Cloud account, then run the same command again")
_NO_MODEL = _c(_A, "check the model name in the manifest and that the region (--region) offers it")
_RATE = _c(_T, "the run slows down by itself; lower --rps if this persists")
_SERVER = _c(_R, "a server-side problem; retried automatically")
_BAD_REQUEST = _c(_F, "the request was malformed; check the job's parameters")
_MODERATION = _c(_F, "the prompt or image was refused by content moderation: reword the prompt")

_BY_CODE: MappingProxyType[str, Classification] = MappingProxyType(
    {
        # 400
        "InvalidParameter": _c(_F, "check the job's size, seed and prompt"),
        "DataInspectionFailed": _MODERATION,
        "data_inspection_failed": _MODERATION,
        "InvalidParameter.DataInspection": _MODERATION,
        "IPInfringementSuspect": _c(_F, "the prompt looks like IP infringement: reword it"),
        "Arrearage": _BILLING,
        "BadRequest.EmptyInput": _BAD_REQUEST,
        "BadRequest.EmptyParameters": _BAD_REQUEST,
        "BadRequest.EmptyModel": _BAD_REQUEST,
        "BadRequest.IllegalInput": _BAD_REQUEST,
        "InvalidURL": _BAD_REQUEST,
        "BadRequest.InputDownloadFailed": _BAD_REQUEST,
        # 401 / 403
        "InvalidApiKey": _KEY,
        "invalid_api_key": _KEY,
        "NOT AUTHORIZED": _c(_A, "check the workspace id and the endpoint (--region, --base-url)"),
        "AccessDenied": _c(_A, "check that this key may call this model, synchronously"),
        "AccessDenied.Unpurchased": _c(_A, "activate Model Studio for this account"),
        "Model.AccessDenied": _RIGHTS,
        "Workspace.AccessDenied": _RIGHTS,
        "App.AccessDenied": _RIGHTS,
        "AllocationQuota.FreeTierOnly": _c(
            _A, "the free quota is used up: turn off 'use free tier only' in the console"
        ),
        # 404
        "ModelNotFound": _NO_MODEL,
        "model_not_found": _NO_MODEL,
        "WorkSpaceNotFound": _c(_A, "check the workspace id given with the key"),
        # On the generation endpoint a bare 404 means the URL itself is wrong, for every job.
        "NotFound": _c(_A, "check --base-url (it must end in /api/v1) and --region"),
        # 408 / 413
        "RequestTimeOut": _SERVER,
        "BadRequest.TooLarge": _c(_F, "the request is too large; shorten the prompt"),
        # 429
        "Throttling": _RATE,
        "Throttling.RateQuota": _RATE,
        "LimitRequests": _RATE,
        "limit_requests": _RATE,
        "Throttling.BurstRate": _RATE,
        "limit_burst_rate": _RATE,
        "Throttling.AllocationQuota": _RATE,
        "insufficient_quota": _RATE,
        "CommodityNotPurchased": _c(_A, "buy or activate this model for the account"),
        "PrepaidBillOverdue": _BILLING,
        "PostpaidBillOverdue": _BILLING,
        # 500 / 503
        "InternalError": _SERVER,
        "internal_error": _SERVER,
        "InternalError.Algo": _SERVER,
        "InternalError.Timeout": _SERVER,
        "InternalError.Upload": _SERVER,
        "InternalError.FileUpload": _SERVER,
        "SystemError": _SERVER,
        "ModelServiceFailed": _SERVER,
        "RewriteFailed": _SERVER,
        "ModelUnavailable": _SERVER,
        # "throttled due to system capacity limits": the service's capacity, not our quota.
        "ModelServingError": _SERVER,
    }
)
_BY_CODE_FOLDED = MappingProxyType({k.casefold(): v for k, v in _BY_CODE.items()})

_BY_PREFIX: tuple[tuple[str, Classification], ...] = (("accessdenied", _BY_CODE["AccessDenied"]),)

# (codes, words the message contains, case-insensitively) -> classification; checked first.
_MESSAGE_RULES: tuple[tuple[frozenset[str], str, Classification], ...] = (
    (
        frozenset({"throttling.allocationquota", "insufficient_quota"}),
        "free allocated quota exceeded",
        _c(_A, "the free quota is used up: enable paid usage for this model in the console"),
    ),
    (frozenset({"invalidparameter"}), "model not exist", _NO_MODEL),
)

_BY_STATUS: MappingProxyType[int, Classification] = MappingProxyType(
    {
        400: _BAD_REQUEST,
        401: _KEY,
        403: _c(_A, "check the key's permissions for this model and the region (--region)"),
        404: _c(_A, "check the model name, --base-url and --region"),
        408: _SERVER,
        413: _BY_CODE["BadRequest.TooLarge"],
        429: _RATE,
        # A gateway error may hide a generation that went through upstream and was billed.
        502: _c(_R, "a gateway error; retried automatically", ambiguous=True),
        504: _c(_R, "a gateway timeout; retried automatically", ambiguous=True),
    }
)
_OTHER_4XX = _c(_F, "the API refused this request")
_OTHER = _SERVER  # 5xx, and anything unexpected (an error body on a 2xx/3xx)


def classify_api_error(status: int, code: str | None, message: str | None) -> Classification:
    """Classify an error answer of the API (an HTTP status and the body's code and message).

    ``code`` and ``message`` are ``None`` when the body had none (e.g. an HTML 502 page).

    >>> classify_api_error(429, "Throttling.RateQuota", None).verdict
    <Verdict.THROTTLED: 'throttled'>
    >>> classify_api_error(503, None, None).verdict
    <Verdict.RETRY: 'retry'>
    """
    folded = (code or "").strip().casefold()
    if folded:
        text = (message or "").casefold()
        for codes, words, special in _MESSAGE_RULES:
            if folded in codes and words in text:
                return special
        found = _BY_CODE.get(code.strip()) if code else None
        found = found or _BY_CODE_FOLDED.get(folded)
        if found is not None:
            return found
        for prefix, family in _BY_PREFIX:
            if folded.startswith(prefix):
                return family
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return _OTHER_4XX if 400 <= status < 500 else _OTHER


_BY_FAULT: MappingProxyType[TransportFault, Classification] = MappingProxyType(
    {
        TransportFault.CONNECT: _c(_R, "could not reach the API; check the network and --base-url"),
        TransportFault.SEND: _c(_R, "the connection failed while sending; retried automatically"),
        TransportFault.RESET: _c(
            _R, "the connection dropped after sending, so it may have been billed", ambiguous=True
        ),
        TransportFault.TIMEOUT: _c(
            _R,
            "no answer in time, so it may have been billed; see --request-timeout",
            ambiguous=True,
        ),
        TransportFault.BAD_RESPONSE: _c(
            _R, "the API sent an unreadable answer, so it may have been billed", ambiguous=True
        ),
    }
)


def classify_transport(fault: TransportFault) -> Classification:
    """Classify a call that got no usable HTTP answer; all are retried, some may be billed.

    >>> classify_transport(TransportFault.CONNECT).ambiguous
    False
    """
    return _BY_FAULT[fault]


# Storage answers that mean the signed URL is dead: retrying the same URL cannot succeed.
_DEAD_URL = frozenset({400, 401, 403, 404, 410})


def classify_download(status: int | None, *, expired: bool) -> DownloadVerdict:
    """Decide whether a failed image download is retried or the image generated again.

    ``status`` is the storage's HTTP status, or ``None`` when the connection failed or the body
    was truncated or corrupt. ``expired`` is true when the URL's ``Expires`` has passed.

    >>> classify_download(None, expired=False)
    <DownloadVerdict.RETRY_DOWNLOAD: 'retry_download'>
    >>> classify_download(403, expired=False)
    <DownloadVerdict.REGENERATE: 'regenerate'>
    """
    if expired or status in _DEAD_URL:
        return DownloadVerdict.REGENERATE
    return DownloadVerdict.RETRY_DOWNLOAD
