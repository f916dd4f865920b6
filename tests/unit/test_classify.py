"""The outcome table: every error code the service documents gets the class it gives.

The expected rows below are typed from the service's API reference, not copied from
``batcher.classify``: (HTTP status, code, the reference's class letter, what batcher does).
T = transient, P = permanent, C = conditional on the message. Which permanent codes stop the
whole run is the README's "What batcher does about each API error".
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect

import pytest

import batcher.classify
from batcher.classify import (
    Classification,
    DownloadVerdict,
    TransportFault,
    Verdict,
    classify_api_error,
    classify_download,
    classify_transport,
)

RETRY, THROTTLED = Verdict.RETRY, Verdict.THROTTLED
FAIL, ABORT = Verdict.FAIL_JOB, Verdict.ABORT_RUN

REFERENCE: list[tuple[int, str, str, Verdict]] = [
    (400, "InvalidParameter", "P", FAIL),
    (400, "DataInspectionFailed", "P", FAIL),
    (400, "data_inspection_failed", "P", FAIL),
    (400, "IPInfringementSuspect", "P", FAIL),
    (400, "Arrearage", "P", ABORT),
    (400, "BadRequest.EmptyInput", "P", FAIL),
    (400, "BadRequest.EmptyParameters", "P", FAIL),
    (400, "BadRequest.EmptyModel", "P", FAIL),
    (400, "BadRequest.IllegalInput", "P", FAIL),
    (400, "InvalidURL", "P", FAIL),
    (400, "InvalidParameter.DataInspection", "P", FAIL),
    (400, "BadRequest.InputDownloadFailed", "P", FAIL),
    (401, "InvalidApiKey", "P", ABORT),
    (401, "invalid_api_key", "P", ABORT),
    (401, "NOT AUTHORIZED", "P", ABORT),
    (403, "AccessDenied", "P", ABORT),
    (403, "AccessDenied.Unpurchased", "P", ABORT),
    (403, "Model.AccessDenied", "P", ABORT),
    (403, "Workspace.AccessDenied", "P", ABORT),
    (403, "App.AccessDenied", "P", ABORT),
    (403, "AllocationQuota.FreeTierOnly", "P", ABORT),
    (404, "ModelNotFound", "P", ABORT),
    (404, "model_not_found", "P", ABORT),
    (404, "WorkSpaceNotFound", "P", ABORT),
    (404, "NotFound", "P", ABORT),
    (408, "RequestTimeOut", "T", RETRY),
    (500, "RequestTimeOut", "T", RETRY),
    (413, "BadRequest.TooLarge", "P", FAIL),
    (429, "Throttling", "T", THROTTLED),
    (429, "Throttling.RateQuota", "T", THROTTLED),
    (429, "LimitRequests", "T", THROTTLED),
    (429, "limit_requests", "T", THROTTLED),
    (429, "Throttling.BurstRate", "T", THROTTLED),
    (429, "limit_burst_rate", "T", THROTTLED),
    (429, "Throttling.AllocationQuota", "C", THROTTLED),
    (429, "insufficient_quota", "C", THROTTLED),
    (429, "CommodityNotPurchased", "P", ABORT),
    (429, "PrepaidBillOverdue", "P", ABORT),
    (429, "PostpaidBillOverdue", "P", ABORT),
    (500, "InternalError", "T", RETRY),
    (500, "internal_error", "T", RETRY),
    (500, "InternalError.Algo", "T", RETRY),
    (500, "InternalError.Timeout", "T", RETRY),
    (500, "InternalError.Upload", "T", RETRY),
    (500, "InternalError.FileUpload", "T", RETRY),
    (500, "SystemError", "T", RETRY),
    (500, "ModelServiceFailed", "T", RETRY),
    (500, "RewriteFailed", "T", RETRY),
    (503, "ModelUnavailable", "T", RETRY),
    (503, "ModelServingError", "T", RETRY),
]

# Example messages quoted by the reference, where it gives one.
MESSAGES = {
    "InvalidParameter": "num_images_per_prompt must be 1",
    "DataInspectionFailed": "Input data may contain inappropriate content.",
    "IPInfringementSuspect": "Input data is suspected of being involved in IP infringement.",
    "Arrearage": "Access denied, please make sure your account is in good standing.",
    "InvalidApiKey": "Invalid API-key provided.",
    "AccessDenied": "current user api does not support synchronous calls",
    "RequestTimeOut": "Request timed out, please try again later.",
    "Throttling": "Requests throttling triggered.",
    "Throttling.RateQuota": "Requests rate limit exceeded, please try again later.",
    "Throttling.AllocationQuota": "Allocated quota exceeded, please increase your quota limit.",
    "ModelUnavailable": "Model is unavailable, please try again later.",
}

IDS = [f"{status}-{code}" for status, code, _, _ in REFERENCE]


@pytest.mark.parametrize(("status", "code", "letter", "expected"), REFERENCE, ids=IDS)
def test_every_reference_code_gets_its_class(
    status: int, code: str, letter: str, expected: Verdict
) -> None:
    got = classify_api_error(status, code, MESSAGES.get(code))
    assert got.verdict is expected
    # The reference's letter and batcher's verdict agree on "retry or not".
    retried = got.verdict in {RETRY, THROTTLED}
    assert retried == (letter in {"T", "C"})
    assert got.ambiguous is False  # the server answered with an error: not billed


@pytest.mark.parametrize(("status", "code", "letter", "expected"), REFERENCE, ids=IDS)
def test_the_code_decides_over_the_status(
    status: int, code: str, letter: str, expected: Verdict
) -> None:
    del status, letter
    for other in (200, 400, 418, 500, 503):
        assert classify_api_error(other, code, None).verdict is expected


@pytest.mark.parametrize(("status", "code", "letter", "expected"), REFERENCE, ids=IDS)
def test_codes_match_whatever_their_case(
    status: int, code: str, letter: str, expected: Verdict
) -> None:
    del letter
    for spelling in (code.upper(), code.lower(), f"  {code} "):
        assert classify_api_error(status, spelling, None).verdict is expected


def test_run_level_stops_each_carry_specific_advice() -> None:
    aborts = [(s, c) for s, c, _, v in REFERENCE if v is ABORT]
    assert len(aborts) >= 15
    for status, code in aborts:
        text = classify_api_error(status, code, None).advice
        assert text.strip() and len(text) < 120 and "\n" not in text
    advice = {c: classify_api_error(s, c, None).advice.lower() for s, c in aborts}
    assert "dashscope_api_key" in advice["InvalidApiKey"]
    assert "--region" in advice["invalid_api_key"]
    assert "top up" in advice["Arrearage"]
    assert "top up" in advice["PostpaidBillOverdue"]
    assert "activate" in advice["AccessDenied.Unpurchased"]
    assert "free tier only" in advice["AllocationQuota.FreeTierOnly"]
    assert "model name" in advice["ModelNotFound"]


def test_every_classification_has_advice() -> None:
    for status, code, _, _ in REFERENCE:
        assert classify_api_error(status, code, None).advice.strip()
    for fault in TransportFault:
        assert classify_transport(fault).advice.strip()


@pytest.mark.parametrize("code", ["Throttling.AllocationQuota", "insufficient_quota"])
def test_free_quota_exhausted_stops_the_run_but_a_quota_rate_limit_does_not(code: str) -> None:
    gone = classify_api_error(429, code, "Free allocated quota exceeded.")
    assert gone.verdict is ABORT
    assert "quota" in gone.advice.lower()
    assert classify_api_error(429, code, "free ALLOCATED quota exceeded").verdict is ABORT
    rate = classify_api_error(429, code, "Allocated quota exceeded, please increase your quota.")
    assert rate.verdict is THROTTLED
    assert classify_api_error(429, code, None).verdict is THROTTLED


def test_model_not_exist_is_wrong_for_every_job() -> None:
    got = classify_api_error(400, "InvalidParameter", "Model not exist.")
    assert got.verdict is ABORT
    assert "model" in got.advice.lower()
    other = classify_api_error(400, "InvalidParameter", "The size is not match the valid range.")
    assert other.verdict is FAIL


def test_any_access_denied_variant_stops_the_run() -> None:
    assert classify_api_error(403, "AccessDenied.SomethingNew", None).verdict is ABORT
    assert classify_api_error(400, "accessdenied.other", "x").verdict is ABORT


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, FAIL),
        (401, ABORT),
        (403, ABORT),
        (404, ABORT),
        (408, RETRY),
        (413, FAIL),
        (429, THROTTLED),
        (500, RETRY),
        (502, RETRY),
        (503, RETRY),
        (504, RETRY),
        (599, RETRY),
        (409, FAIL),
        (418, FAIL),
        (451, FAIL),
        (507, RETRY),
    ],
)
def test_fallback_by_status_when_the_code_is_missing_or_unknown(
    status: int, expected: Verdict
) -> None:
    for code in (None, "", "Unknown", "SomeFutureCode"):
        assert classify_api_error(status, code, None).verdict is expected
        assert classify_api_error(status, code, "<html>Bad Gateway</html>").verdict is expected


def test_status_fallback_advice_for_run_level_statuses() -> None:
    for status in (401, 403, 404):
        assert classify_api_error(status, None, None).advice.strip()


def test_gateway_errors_without_a_code_may_have_been_billed() -> None:
    assert classify_api_error(502, None, None).ambiguous
    assert classify_api_error(504, None, "upstream timed out").ambiguous
    assert not classify_api_error(500, None, None).ambiguous
    assert not classify_api_error(503, "ModelUnavailable", None).ambiguous


@pytest.mark.parametrize(
    ("fault", "ambiguous"),
    [
        (TransportFault.CONNECT, False),
        (TransportFault.SEND, False),
        (TransportFault.RESET, True),
        (TransportFault.TIMEOUT, True),
        (TransportFault.BAD_RESPONSE, True),
    ],
)
def test_transport_faults_are_retried_and_flag_possible_billing(
    fault: TransportFault, ambiguous: bool
) -> None:
    got = classify_transport(fault)
    assert got == Classification(verdict=RETRY, ambiguous=ambiguous, advice=got.advice)


def test_every_transport_fault_is_classified() -> None:
    assert {f.value for f in TransportFault} == {
        "connect",
        "send",
        "reset",
        "timeout",
        "bad_response",
    }
    for fault in TransportFault:
        assert classify_transport(fault).verdict is RETRY


@pytest.mark.parametrize(
    ("status", "expired", "expected"),
    [
        (None, False, DownloadVerdict.RETRY_DOWNLOAD),  # connection problem, truncated, corrupt
        (None, True, DownloadVerdict.REGENERATE),
        (200, False, DownloadVerdict.RETRY_DOWNLOAD),  # e.g. a body cut short after the header
        (403, False, DownloadVerdict.REGENERATE),  # storage: the signature has expired
        (404, False, DownloadVerdict.REGENERATE),
        (410, False, DownloadVerdict.REGENERATE),
        (408, False, DownloadVerdict.RETRY_DOWNLOAD),
        (429, False, DownloadVerdict.RETRY_DOWNLOAD),
        (500, False, DownloadVerdict.RETRY_DOWNLOAD),
        (503, False, DownloadVerdict.RETRY_DOWNLOAD),
        (500, True, DownloadVerdict.REGENERATE),
    ],
)
def test_download_failures(status: int | None, expired: bool, expected: DownloadVerdict) -> None:
    assert classify_download(status, expired=expired) is expected


def test_values_are_frozen_and_enums_are_strings() -> None:
    got = classify_api_error(500, "InternalError", None)
    with pytest.raises(AttributeError):
        got.verdict = ABORT  # type: ignore[misc]
    assert str(Verdict.ABORT_RUN) == "abort_run"
    assert isinstance(Verdict.ABORT_RUN, str)
    assert {v.value for v in Verdict} == {"retry", "throttled", "fail_job", "abort_run"}
    assert {v.value for v in DownloadVerdict} == {"retry_download", "regenerate"}


def test_docstring_examples() -> None:
    assert doctest.testmod(batcher.classify).failed == 0


# What the pure modules may import: the standard library's value types and each other.
ALLOWED_IMPORTS = {
    "__future__",
    "dataclasses",
    "datetime",
    "decimal",
    "email.utils",
    "enum",
    "math",
    "random",
    "re",
    "types",
    "batcher.classify",
    "jobs.errors",  # pure too (typing only): its rebuild_error unpickles both packages' errors
}


@pytest.mark.parametrize("name", ["classify", "backoff", "pricing", "errors"])
def test_pure_modules_import_nothing_that_does_io(name: str) -> None:
    module = importlib.import_module(f"batcher.{name}")
    tree = ast.parse(inspect.getsource(module))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS
