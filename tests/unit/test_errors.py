"""The exception tree, default messages, and that no secret reaches exception text."""

from __future__ import annotations

import copy
import doctest
import pickle

import pytest

import batcher.errors
from batcher.classify import DownloadVerdict, TransportFault, Verdict
from batcher.errors import (
    ApiError,
    BatcherError,
    ConfigError,
    DownloadError,
    LanesInvalid,
    PermanentJobError,
    RunAborted,
    TransientError,
    TransportError,
)

KEY = "sk-0123456789abcdef0123456789abcdef"

LEAVES = [
    TransientError,
    PermanentJobError,
    RunAborted,
    ApiError,
    TransportError,
    DownloadError,
    ConfigError,
]


def test_the_tree() -> None:
    assert issubclass(BatcherError, Exception)
    for leaf in LEAVES:
        assert leaf.__bases__ == (BatcherError,)
    assert issubclass(LanesInvalid, ConfigError)  # a bad lanes file is a configuration error
    assert sorted(batcher.errors.__all__) == sorted(
        ["BatcherError", "LanesInvalid", *(c.__name__ for c in LEAVES)]
    )


def test_the_module_docstring_draws_every_class() -> None:
    doc = batcher.errors.__doc__ or ""
    for cls in [BatcherError, *LEAVES]:
        assert cls.__name__ in doc


@pytest.mark.parametrize(
    "cls", [BatcherError, TransientError, PermanentJobError, RunAborted, ConfigError]
)
def test_the_docstring_is_the_default_message(cls: type[BatcherError]) -> None:
    assert str(cls()) == (cls.__doc__ or "").strip()
    assert str(cls("something specific")) == "something specific"


def test_config_error_for_a_missing_key() -> None:
    error = ConfigError("DASHSCOPE_API_KEY is not set; export it or use --emulate")
    assert isinstance(error, BatcherError)
    assert "DASHSCOPE_API_KEY" in str(error)


def test_run_aborted_carries_its_advice() -> None:
    error = RunAborted("InvalidApiKey: Invalid API-key provided.", advice="check the key")
    assert error.advice == "check the key"
    assert str(error) == "InvalidApiKey: Invalid API-key provided; check the key"
    assert RunAborted().advice is None


def test_api_error_fields_and_text() -> None:
    error = ApiError(
        status=400,
        code="InvalidParameter",
        message="num_images_per_prompt must be 1",
        request_id="a4d78a5f-0000",
        retry_after=None,
    )
    assert (error.status, error.code, error.request_id) == (
        400,
        "InvalidParameter",
        "a4d78a5f-0000",
    )
    assert error.message == "num_images_per_prompt must be 1"
    assert str(error) == (
        "HTTP 400 InvalidParameter: num_images_per_prompt must be 1 (request_id a4d78a5f-0000)"
    )
    assert error.classification.verdict is Verdict.FAIL_JOB


def test_api_error_classification_follows_the_table() -> None:
    assert ApiError(status=401, code="InvalidApiKey").classification.verdict is Verdict.ABORT_RUN
    throttled = ApiError(status=429, code="Throttling.RateQuota", retry_after="3")
    assert throttled.classification.verdict is Verdict.THROTTLED
    assert throttled.retry_after == "3"
    free = ApiError(status=429, code="insufficient_quota", message="Free allocated quota exceeded.")
    assert free.classification.verdict is Verdict.ABORT_RUN
    assert ApiError(status=502).classification.ambiguous


def test_api_error_without_code_or_message() -> None:
    error = ApiError(status=502)
    assert str(error) == "HTTP 502 error: The API answered with an error."


def test_api_error_takes_no_headers() -> None:
    # Headers have no way in, so the Authorization header cannot leak through an ApiError.
    with pytest.raises(TypeError):
        ApiError(status=401, headers={"Authorization": f"Bearer {KEY}"})  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "echoed",
    [
        f"Incorrect API key provided: {KEY}.",
        f"request headers: {{'Authorization': 'Bearer {KEY}'}}",
        f"Authorization: bearer {KEY}",
        f"api key {KEY} is not valid for this region",
    ],
)
def test_api_error_text_never_holds_the_key(echoed: str) -> None:
    error = ApiError(status=401, code="InvalidApiKey", message=echoed, request_id="r-1")
    for text in (str(error), repr(error), error.message or "", str(error.args)):
        assert KEY not in text
        assert KEY[3:] not in text
    assert "InvalidApiKey" in str(error)
    assert "***" in str(error)


def test_messages_are_one_bounded_line() -> None:
    page = "<html>\n<body>\n" + "Bad Gateway " * 200 + "\n</body></html>"
    error = ApiError(status=502, message=page)
    assert "\n" not in str(error)
    assert len(str(error)) <= 300
    assert str(error).endswith("...")


def test_ordinary_words_are_not_masked() -> None:
    text = "disk-full task-1234 risk-free"
    assert str(ApiError(status=500, message=text)) == f"HTTP 500 error: {text}"


@pytest.mark.parametrize("fault", list(TransportFault))
def test_transport_error(fault: TransportFault) -> None:
    error = TransportError(fault, "ServerDisconnectedError")
    assert error.fault is fault
    assert error.classification.verdict is Verdict.RETRY
    assert str(error).startswith(f"{fault.value}: ")
    assert "ServerDisconnectedError" in str(error)
    assert str(TransportError(fault)) == f"{fault.value}: {error.classification.advice}"


def test_transport_error_ambiguity() -> None:
    assert TransportError(TransportFault.TIMEOUT).classification.ambiguous
    assert not TransportError(TransportFault.CONNECT).classification.ambiguous


@pytest.mark.parametrize(
    ("reason", "status", "verdict"),
    [
        ("truncated", None, DownloadVerdict.RETRY_DOWNLOAD),
        ("corrupt", None, DownloadVerdict.RETRY_DOWNLOAD),
        ("too_large", 200, DownloadVerdict.RETRY_DOWNLOAD),
        ("size_mismatch", 200, DownloadVerdict.RETRY_DOWNLOAD),
        ("expired", None, DownloadVerdict.REGENERATE),
        ("http_403", 403, DownloadVerdict.REGENERATE),
        ("http_404", 404, DownloadVerdict.REGENERATE),
        ("http_503", 503, DownloadVerdict.RETRY_DOWNLOAD),
    ],
)
def test_download_error(reason: str, status: int | None, verdict: DownloadVerdict) -> None:
    error = DownloadError(reason, status=status)
    assert (error.reason, error.status, error.verdict) == (reason, status, verdict)
    assert reason in str(error)


def test_download_error_masks_signed_url_credentials() -> None:
    url = "https://r.oss/x.png?Expires=1761000000&OSSAccessKeyId=LTAI5tSecretId&Signature=a%2Bb%3D"
    error = DownloadError("http_403", status=403, detail=f"GET {url}")
    for text in (str(error), error.detail or ""):
        assert "LTAI5tSecretId" not in text and "a%2Bb%3D" not in text
        assert "Expires=1761000000" in text


@pytest.mark.parametrize(
    "error",
    [
        BatcherError(),
        RunAborted("stop", advice="do this"),
        ApiError(
            status=429, code="Throttling", message="slow down", request_id="r", retry_after="2"
        ),
        TransportError(TransportFault.RESET, "peer reset"),
        DownloadError("truncated", status=200, detail="got 10 of 20 bytes"),
        ConfigError("bad --rps"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickle_and_copy(error: BatcherError) -> None:
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(clone) is type(error)
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)


def test_docstring_examples() -> None:
    assert doctest.testmod(batcher.errors).failed == 0
