"""The client's one translation point (STYLE convention 4) and its tolerant parsing."""

from __future__ import annotations

import json
from types import SimpleNamespace

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from batcher.classify import TransportFault, Verdict
from batcher.client import (
    base_url_for,
    parse_error,
    parse_success,
    parse_task,
    translate_exception,
    url_expiry,
)
from batcher.errors import ConfigError, TransportError

REQ = aiohttp.RequestInfo(
    URL("http://127.0.0.1/x"), "POST", CIMultiDictProxy(CIMultiDict()), URL("http://127.0.0.1/x")
)
CONN_KEY = SimpleNamespace(ssl=None, host="127.0.0.1", port=1)

EXCEPTIONS = [
    (aiohttp.ClientConnectorError(CONN_KEY, ConnectionRefusedError(111, "refused")), "connect"),
    (TimeoutError(), "timeout"),
    (aiohttp.ServerTimeoutError("read timeout"), "timeout"),
    (aiohttp.ConnectionTimeoutError("connect timeout"), "connect"),  # never sent
    (aiohttp.SocketTimeoutError("socket timeout"), "timeout"),
    (aiohttp.ServerDisconnectedError(), "reset"),
    (aiohttp.ClientOSError(104, "Connection reset by peer"), "reset"),
    (aiohttp.ClientPayloadError("Response payload is not completed"), "bad_response"),
    (aiohttp.ContentTypeError(REQ, ()), "bad_response"),
    (aiohttp.ClientResponseError(REQ, ()), "bad_response"),
    (aiohttp.ClientConnectionError("closed"), "reset"),
    (aiohttp.ClientError("other"), "reset"),
    (ConnectionResetError(104, "reset"), "reset"),
]


@pytest.mark.parametrize(
    ("exc", "fault"), EXCEPTIONS, ids=[type(e).__name__ for e, _ in EXCEPTIONS]
)
def test_every_known_exception_maps_to_a_transport_fault(exc, fault):
    err = translate_exception(exc)
    assert isinstance(err, TransportError)
    assert err.fault == TransportFault(fault)
    assert err.classification.verdict is Verdict.RETRY
    # Surely-not-sent faults are not ambiguous; anything after sending is.
    assert err.classification.ambiguous == (fault != "connect")


def test_non_transport_exceptions_are_not_swallowed():
    with pytest.raises(TypeError):
        translate_exception(ValueError("a bug"))


SUCCESS = {
    "output": {
        "choices": [
            {
                "finish_reason": "stop",
                "message": {
                    "role": "assistant",
                    "content": [
                        {"image": "http://h/a.png?Expires=1700000000&OSSAccessKeyId=x&Signature=y"},
                        {"text": "a red chair"},
                    ],
                    "reasoning_content": "",
                },
            }
        ]
    },
    "usage": {
        "width": 1024,
        "height": 1536,
        "image_count": 1,
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
    },
    "request_id": "8a0809b4-0000-0000-0000-000000000000",
}


def test_documented_success_parses():
    r = parse_success(SUCCESS, 12.5)
    assert r.image_url.startswith("http://h/a.png")
    assert r.url_expires_at == 1_700_000_000
    assert (r.width, r.height, r.image_count) == (1024, 1536, 1)
    assert r.actual_prompt == "a red chair"
    assert r.request_id.startswith("8a0809b4")
    assert r.reasoning_tokens is None


def test_tolerant_parsing_of_variants():
    body = json.loads(json.dumps(SUCCESS))
    body["output"]["choices"][0]["message"]["content"].reverse()  # order differs
    body["usage"] = {"output_tokens_details": {"reasoning_tokens": 7}, "extra": "ignored"}
    body["new_field"] = {"anything": 1}
    del body["request_id"]
    r = parse_success(body, 1.0)
    assert r.width is None and r.reasoning_tokens == 7 and r.request_id is None
    assert r.actual_prompt == "a red chair"
    # an async-task shaped body is accepted too
    r2 = parse_success({"output": {"results": [{"url": "http://h/b.png"}]}}, 1.0)
    assert r2.image_url == "http://h/b.png" and r2.url_expires_at is None


def test_several_images_of_one_answer_keep_their_places() -> None:
    """A synchronous answer of n > 1 images lists them in one message; a task's results keep
    the failed slots in place, so each image knows its place (its file's number)."""
    content = [{"image": "http://h/1.png"}, {"text": "t"}, {"image": "http://h/2.png"}]
    r = parse_success({"output": {"choices": [{"message": {"content": content}}]}}, 1.0)
    assert (r.image_url, r.slot, r.more_urls) == ("http://h/1.png", 1, ("http://h/2.png",))
    report = parse_task(
        {
            "output": {
                "task_status": "SUCCEEDED",
                "results": [
                    {"url": "http://h/a.png"},
                    {"code": "InternalError.Algo", "message": "Inference error."},
                    {"url": "http://h/c.png"},
                ],
            },
            "usage": {"image_count": 2},
        },
        1.0,
    )
    assert [(i.image_url, i.slot) for i in report.images] == [
        ("http://h/a.png", 1),
        ("http://h/c.png", 3),
    ]
    assert report.failed_slots == (("InternalError.Algo", "Inference error."),)
    assert report.image_count == 2


@pytest.mark.parametrize(
    "body", [[], "x", {}, {"output": {"choices": [{"message": {"content": [{"text": "t"}]}}]}}]
)
def test_a_success_without_an_image_is_a_bad_response(body):
    with pytest.raises(TransportError) as info:
        parse_success(body, 1.0)
    assert info.value.fault is TransportFault.BAD_RESPONSE


def test_error_envelope_and_variants():
    e = parse_error(
        400,
        b'{"request_id":"r1","code":"InvalidParameter",'
        b'"message":"num_images_per_prompt must be 1"}',
        None,
    )
    assert (e.status, e.code, e.request_id) == (400, "InvalidParameter", "r1")
    assert e.classification.verdict is Verdict.FAIL_JOB
    msg = parse_error(429, b'{"code":"Throttling.RateQuota","msg":"slow down"}', "3")
    assert msg.message == "slow down" and msg.retry_after == "3"
    assert msg.classification.verdict is Verdict.THROTTLED
    plain = parse_error(502, b"<html>Bad Gateway</html>", None)
    assert plain.code is None and "Bad Gateway" in (plain.message or "")
    assert plain.classification.verdict is Verdict.RETRY


def test_base_urls():
    assert base_url_for("intl").endswith("/api/v1")
    assert base_url_for("cn") != base_url_for("intl")
    assert base_url_for("intl", "http://127.0.0.1:9/api/v1/") == "http://127.0.0.1:9/api/v1"
    with pytest.raises(ConfigError):
        base_url_for("intl", "http://127.0.0.1:9/v2")
    with pytest.raises(ConfigError):
        base_url_for("mars")


def test_url_expiry_of_odd_urls():
    assert url_expiry("http://h/x.png") is None
    assert url_expiry("http://h/x.png?Expires=abc") is None
