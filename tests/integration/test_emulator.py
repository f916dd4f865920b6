"""The emulator over real loopback HTTP: contract, URLs, faults, quota, stats, reconfiguration."""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import io
import math
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from PIL import Image

from batcher.emulator import Emulator, EmulatorConfig, running_emulator

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]

GENERATION = "/services/aigc/multimodal-generation/generation"
KEY = "sk-test-key"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
FAST = EmulatorConfig(latency="0", rps=math.inf, seed=1)


def body(prompt: Any = "a red fox in the snow", **parameters: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": "z-image-turbo",
        "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]},
    }
    payload["parameters"] = {"size": "512*512", **parameters}
    return payload


async def post(
    session: aiohttp.ClientSession,
    emu: Emulator,
    payload: Any = None,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    data: bytes | io.BytesIO | None = None,
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": payload or body()}
    async with session.post(emu.base_url + GENERATION, headers=sent, **kwargs) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json(), response


def image_url(reply: dict[str, Any]) -> str:
    url = reply["output"]["choices"][0]["message"]["content"][0]["image"]
    assert isinstance(url, str)
    return url


async def download(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, Any]:
    async with session.get(url) as response:
        return response.status, await response.read(), response.headers


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as client:
        yield client


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with running_emulator(FAST) as emulator:
        yield emulator


# -- the success body ---------------------------------------------------------------------------


async def test_success_body_is_exactly_the_documented_shape(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    assert emu.base_url == f"http://127.0.0.1:{emu.port}/api/v1"
    assert emu.root_url == f"http://127.0.0.1:{emu.port}"
    status, reply, _ = await post(session, emu, body("a red fox", seed=42))
    assert status == 200
    assert set(reply) == {"output", "usage", "request_id"}
    assert UUID.fullmatch(reply["request_id"])
    (choice,) = reply["output"]["choices"]
    assert choice["finish_reason"] == "stop"
    message = choice["message"]
    assert set(message) == {"role", "content", "reasoning_content"}
    assert message["role"] == "assistant"
    assert message["reasoning_content"] == ""
    image, text = message["content"]
    assert set(image) == {"image"} and text == {"text": "a red fox"}
    assert reply["usage"] == {
        "width": 512,
        "height": 512,
        "image_count": 1,
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
    }


async def test_default_size_is_1024_by_1536(emu: Emulator, session: aiohttp.ClientSession) -> None:
    payload = body()
    del payload["parameters"]
    status, reply, _ = await post(session, emu, payload)
    assert status == 200
    assert (reply["usage"]["width"], reply["usage"]["height"]) == (1024, 1536)
    _, data, _ = await download(session, image_url(reply))
    assert Image.open(io.BytesIO(data)).size == (1024, 1536)


async def test_prompt_extend_rewrites_and_counts_tokens(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    status, reply, _ = await post(session, emu, body("a red fox", prompt_extend=True))
    assert status == 200
    message = reply["output"]["choices"][0]["message"]
    rewritten = message["content"][1]["text"]
    assert rewritten.startswith("a red fox") and len(rewritten) > len("a red fox")
    assert message["reasoning_content"]
    usage = reply["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["output_tokens_details"]["reasoning_tokens"] > 0
    assert emu.stats()["images_billed_prompt_extend"] == 1


async def test_long_prompt_is_cut_to_800_characters(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    prompt = "".join(chr(0x4E00 + i % 500) for i in range(1200))
    status, reply, _ = await post(session, emu, body(prompt, negative_prompt="x", watermark=True))
    assert status == 200
    assert reply["output"]["choices"][0]["message"]["content"][1]["text"] == prompt[:800]


# -- errors -------------------------------------------------------------------------------------


def _assert_error(status: int, reply: dict[str, Any], expected: int, code: str) -> None:
    assert (status, reply["code"]) == (expected, code), reply
    assert set(reply) == {"request_id", "code", "message"}
    assert UUID.fullmatch(reply["request_id"]) and reply["message"]


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        ({"input": body()["input"]}, "BadRequest.EmptyModel", None),
        ({**body(), "model": "wanx-v1"}, "InvalidParameter", "Model not exist."),
        ({"model": "z-image-turbo"}, "BadRequest.EmptyInput", None),
        (
            {**body(), "input": {"messages": body()["input"]["messages"] * 2}},
            "InvalidParameter",
            None,
        ),
        (body(n=2), "InvalidParameter", "num_images_per_prompt must be 1"),
        (body(size="512x512"), "InvalidParameter", None),
        (body(size="256*256"), "InvalidParameter", None),
        (body(size="4096*4096"), "InvalidParameter", None),
        (body(seed=-1), "InvalidParameter", None),
        (body(seed=2**31), "InvalidParameter", None),
        (body(prompt_extend="true"), "InvalidParameter", None),
        (body(""), "InvalidParameter", None),
        ([1, 2], "BadRequest.IllegalInput", None),
    ],
)
async def test_validation_errors(
    emu: Emulator,
    session: aiohttp.ClientSession,
    payload: Any,
    code: str,
    message: str | None,
) -> None:
    status, reply, _ = await post(session, emu, payload)
    _assert_error(status, reply, 400, code)
    if message is not None:
        assert reply["message"] == message
    assert emu.stats()["images_billed"] == 0


async def test_non_json_body(emu: Emulator, session: aiohttp.ClientSession) -> None:
    status, reply, _ = await post(session, emu, data=b"size=512*512&prompt=fox")
    _assert_error(status, reply, 400, "BadRequest.IllegalInput")


async def test_too_large_body(emu: Emulator, session: aiohttp.ClientSession) -> None:
    status, reply, _ = await post(session, emu, data=io.BytesIO(b"{" + b" " * 1_100_000 + b"}"))
    _assert_error(status, reply, 413, "BadRequest.TooLarge")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "sk-test"},
        {"Authorization": "Bearer "},
    ],
)
async def test_missing_or_bad_key_is_401(
    emu: Emulator, session: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    status, reply, _ = await post(session, emu, key=None, headers=headers)
    _assert_error(status, reply, 401, "InvalidApiKey")


async def test_configured_key_only(session: aiohttp.ClientSession) -> None:
    async with running_emulator(EmulatorConfig(latency="0", api_key="sk-only-this")) as emu:
        status, reply, _ = await post(session, emu, key="sk-another")
        _assert_error(status, reply, 401, "InvalidApiKey")
        assert "sk-another" not in reply["message"]
        status, _, _ = await post(session, emu, key="sk-only-this")
        assert status == 200


async def test_async_header_is_403(emu: Emulator, session: aiohttp.ClientSession) -> None:
    status, reply, _ = await post(session, emu, headers={"X-DashScope-Async": "enable"})
    _assert_error(status, reply, 403, "AccessDenied")


async def test_moderated_words(session: aiohttp.ClientSession) -> None:
    async with running_emulator(EmulatorConfig(latency="0", moderate=("gore",))) as emu:
        status, reply, _ = await post(session, emu, body("Some GORE here"))
        _assert_error(status, reply, 400, "DataInspectionFailed")
        status, _, _ = await post(session, emu, body("a garden"))
        assert status == 200


async def test_unknown_api_path_is_a_json_404(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    async with session.get(emu.base_url + "/services/aigc/nothing/here") as response:
        assert response.status == 404
        assert (await response.json())["code"] == "NotFound"


async def test_fixed_latency_is_applied(session: aiohttp.ClientSession) -> None:
    async with running_emulator(EmulatorConfig(latency="150", rps=math.inf)) as emu:
        started = time.monotonic()
        status, _, _ = await post(session, emu)
        assert status == 200
        assert time.monotonic() - started >= 0.15
        started = time.monotonic()
        status, _, _ = await post(session, emu, body(n=3))
        assert status == 400
        assert time.monotonic() - started < 0.15  # a refusal comes at once


# -- images and their URLs ---------------------------------------------------------------------


async def test_image_url_shape_and_download(emu: Emulator, session: aiohttp.ClientSession) -> None:
    _, reply, _ = await post(session, emu, body(size="640*512"))
    url = image_url(reply)
    match = re.fullmatch(
        re.escape(emu.root_url)
        + r"/1d/[0-9a-f]{2}/(\d{8})/[0-9a-f]{8}/[0-9a-f-]{36}\.png"
        + r"\?Expires=(\d+)&OSSAccessKeyId=LTAI\w+&Signature=[A-Za-z0-9%]+",
        url,
    )
    assert match, url
    assert match[1] == time.strftime("%Y%m%d", time.gmtime())
    assert abs(int(match[2]) - (time.time() + 86400)) < 5
    status, data, headers = await download(session, url)
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    assert int(headers["Content-Length"]) == len(data)
    Image.open(io.BytesIO(data)).verify()
    assert Image.open(io.BytesIO(data)).size == (640, 512)


async def test_images_differ_by_prompt_and_seed(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    digests = []
    for payload in (
        body("a fox", seed=1),
        body("a fox", seed=2),
        body("a cat", seed=1),
        body("a fox", seed=1),
    ):
        _, reply, _ = await post(session, emu, payload)
        _, data, _ = await download(session, image_url(reply))
        digests.append(hashlib.sha256(data).hexdigest())
    assert len(set(digests[:3])) == 3
    assert digests[3] == digests[0]


def _oss_error(data: bytes) -> tuple[str | None, str | None]:
    root = ET.fromstring(data)
    return root.findtext("Code"), root.findtext("Message")


async def test_tampered_urls_are_refused(emu: Emulator, session: aiohttp.ClientSession) -> None:
    _, reply, _ = await post(session, emu)
    url = image_url(reply)
    signature = url.rsplit("Signature=", 1)[1]
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    expires = re.search(r"Expires=(\d+)", url)
    assert expires is not None
    later = url.replace(f"Expires={expires[1]}", f"Expires={int(expires[1]) + 1000}")
    for bad in (url.replace(signature, flipped), later):
        status, data, headers = await download(session, bad)
        assert status == 403
        assert headers["Content-Type"].startswith("application/xml")
        assert _oss_error(data)[0] == "SignatureDoesNotMatch"
    status, data, _ = await download(session, url.split("?")[0])
    assert (status, _oss_error(data)[0]) == (403, "AccessDenied")
    status, _, _ = await download(session, url)
    assert status == 200


async def test_expired_url(emu: Emulator, session: aiohttp.ClientSession) -> None:
    emu.reconfigure(url_ttl=-10)
    _, reply, _ = await post(session, emu)
    status, data, _ = await download(session, image_url(reply))
    assert status == 403
    assert _oss_error(data) == ("AccessDenied", "Request has expired.")
    assert emu.stats()["download_by_status"] == {"403": 1}


async def test_forgotten_image_is_404(session: aiohttp.ClientSession) -> None:
    async with running_emulator(EmulatorConfig(latency="0", rps=math.inf, max_images=1)) as emu:
        _, first, _ = await post(session, emu, body("one"))
        _, second, _ = await post(session, emu, body("two"))
        status, data, _ = await download(session, image_url(first))
        assert (status, _oss_error(data)[0]) == (404, "NoSuchKey")
        status, _, _ = await download(session, image_url(second))
        assert status == 200


# -- faults -------------------------------------------------------------------------------------

N = 300
FRACTION = 0.3
TOLERANCE = 0.08  # about 3 standard deviations of a binomial share at N=300


async def _outcome(
    session: aiohttp.ClientSession, emu: Emulator, number: int, give_up_after: float
) -> str:
    try:
        async with session.post(
            emu.base_url + GENERATION,
            json=body(f"prompt {number}", seed=number),
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=aiohttp.ClientTimeout(sock_read=give_up_after),
        ) as response:
            reply = await response.json()
            return "200" if response.status == 200 else f"{response.status} {reply['code']}"
    except TimeoutError:
        return "timeout"
    except aiohttp.ClientConnectionError:
        return "dropped"


async def _outcomes(
    session: aiohttp.ClientSession, emu: Emulator, count: int, give_up_after: float = 10.0
) -> list[str]:
    return list(
        await asyncio.gather(*(_outcome(session, emu, n, give_up_after) for n in range(count)))
    )


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [
        ("500", "500 InternalError"),
        ("503", "503 ModelUnavailable"),
        ("429", "429 Throttling"),
        ("free-quota", "429 Throttling.AllocationQuota"),
        ("Arrearage", "400 Arrearage"),
        ("InternalError.Algo", "500 InternalError.Algo"),
        ("Throttling.AllocationQuota", "429 Throttling.AllocationQuota"),
        ("reset", "dropped"),
        ("lost", "dropped"),
    ],
)
async def test_generation_fault_fractions(
    session: aiohttp.ClientSession, kind: str, outcome: str
) -> None:
    config = EmulatorConfig(latency="0", rps=math.inf, seed=11, faults=f"{kind}={FRACTION}")
    async with running_emulator(config) as emu:
        outcomes = collections.Counter(await _outcomes(session, emu, N))
        stats = emu.stats()
    assert set(outcomes) == {"200", outcome}
    assert abs(outcomes[outcome] / N - FRACTION) < TOLERANCE
    assert stats["faults_injected"] == {kind: outcomes[outcome]}
    assert stats["generate_requests"] == N
    if kind == "lost":  # billed, then dropped: the ambiguous case
        assert stats["images_billed"] == N
    else:
        assert stats["images_billed"] == outcomes["200"]


async def test_hang_fraction_and_clients_giving_up(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(latency="0", rps=math.inf, seed=5, faults="hang=0.25")
    async with running_emulator(config) as emu:
        started = time.monotonic()
        outcomes = collections.Counter(await _outcomes(session, emu, 200, give_up_after=0.5))
        assert time.monotonic() - started < 5
        assert set(outcomes) == {"200", "timeout"}
        assert abs(outcomes["timeout"] / 200 - 0.25) < TOLERANCE
        assert emu.stats()["images_billed"] == outcomes["200"]


async def test_hung_request_does_not_block_shutdown(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(latency="0", faults="hang=1")
    async with running_emulator(config) as emu:
        pending = asyncio.ensure_future(_outcome(session, emu, 0, give_up_after=60))
        await asyncio.sleep(0.2)
        assert not pending.done()
        started = time.monotonic()
    assert time.monotonic() - started < 2
    assert await pending == "dropped"


async def test_sleeping_request_does_not_block_shutdown(session: aiohttp.ClientSession) -> None:
    async with running_emulator(EmulatorConfig(latency="30000")) as emu:
        pending = asyncio.ensure_future(_outcome(session, emu, 0, give_up_after=60))
        await asyncio.sleep(0.2)
        started = time.monotonic()
    assert time.monotonic() - started < 2
    assert await pending == "dropped"


async def _download_outcome(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(url) as response:
            data = await response.read()
            assert int(response.headers["Content-Length"]) == len(data)
            md5 = hashlib.md5(data, usedforsecurity=False).digest()
            try:
                Image.open(io.BytesIO(data)).verify()
            except Exception:
                assert response.headers["Content-MD5"] != base64.b64encode(md5).decode()
                return "corrupt"
            return "ok"
    except aiohttp.ClientPayloadError:
        return "truncated"


@pytest.mark.parametrize(("kind", "outcome"), [("truncate", "truncated"), ("corrupt", "corrupt")])
async def test_download_fault_fractions(
    session: aiohttp.ClientSession, kind: str, outcome: str
) -> None:
    config = EmulatorConfig(latency="0", rps=math.inf, seed=3, faults=f"{kind}={FRACTION}")
    async with running_emulator(config) as emu:
        urls = []
        for number in range(N):
            status, reply, _ = await post(session, emu, body(f"p{number}", seed=number))
            assert status == 200  # download faults never touch generation
            urls.append(image_url(reply))
        outcomes = collections.Counter(
            await asyncio.gather(*(_download_outcome(session, url) for url in urls))
        )
        stats = emu.stats()
    assert set(outcomes) == {"ok", outcome}
    assert abs(outcomes[outcome] / N - FRACTION) < TOLERANCE
    assert stats["faults_injected"] == {kind: outcomes[outcome]}
    assert stats["downloads"] == N


async def test_same_seed_same_fault_sequence(session: aiohttp.ClientSession) -> None:
    faults = "500=0.15,503=0.1,reset=0.1,Arrearage=0.05"

    async def run(seed: int, concurrent: bool) -> list[str]:
        config = EmulatorConfig(latency="0", rps=math.inf, seed=seed, faults=faults)
        async with running_emulator(config) as emu:
            if concurrent:
                return await _outcomes(session, emu, 120)
            return [await _outcome(session, emu, n, 10.0) for n in range(120)]

    first = await run(7, concurrent=False)
    assert await run(7, concurrent=False) == first
    assert await run(8, concurrent=False) != first
    # Under concurrency the arrival order varies, but the n-th arrival gets the n-th decision.
    assert collections.Counter(await run(7, concurrent=True)) == collections.Counter(first)
    assert len(set(first)) == 5


async def test_same_seed_same_latency_draws(session: aiohttp.ClientSession) -> None:
    async def run(seed: int) -> float:
        config = EmulatorConfig(latency="lognormal:1:0.5", rps=math.inf, seed=seed)
        async with running_emulator(config) as emu:
            for number in range(20):
                assert (await post(session, emu, body(f"p{number}")))[0] == 200
            total = emu.stats()["latency_seconds_total"]
            assert isinstance(total, float)
            return total

    first = await run(3)
    assert 0.005 < first < 0.2
    assert await run(3) == first
    assert await run(4) != first


# -- quota --------------------------------------------------------------------------------------


async def test_quota_burst(session: aiohttp.ClientSession) -> None:
    async with running_emulator(EmulatorConfig(latency="0", rps=5)) as emu:
        results = await asyncio.gather(*(post(session, emu) for _ in range(20)))
        statuses = collections.Counter(status for status, _, _ in results)
        assert statuses == {200: 5, 429: 15}
        for status, reply, response in results:
            if status == 429:
                _assert_error(status, reply, 429, "Throttling.RateQuota")
                assert "Retry-After" not in response.headers
        status, _, _ = await post(session, emu, key="sk-other-key")
        assert status == 200  # the quota is per key
        assert emu.stats()["throttled"] == 15


async def test_keys_of_one_account_share_its_quota_and_accounts_do_not(
    session: aiohttp.ClientSession,
) -> None:
    accounts = {"acct-a": ("sk-a-one", "sk-a-two"), "acct-b": ("sk-b-one",)}
    config = EmulatorConfig(latency="0", rps=2, accounts=accounts)
    async with running_emulator(config) as emu:
        first = [await post(session, emu, key=k) for k in ("sk-a-one", "sk-a-two", "sk-a-two")]
        assert [status for status, _, _ in first] == [200, 200, 429]  # one quota for both keys
        status, _, _ = await post(session, emu, key="sk-b-one")
        assert status == 200  # another account: a quota of its own
        status, reply, _ = await post(session, emu, key="sk-in-no-account")
        _assert_error(status, reply, 401, "InvalidApiKey")
        assert "sk-in-no-account" not in reply["message"]
        assert "sk-a-one" not in str(emu.config.public_dict())


async def test_an_account_may_have_its_own_quota(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(
        latency="0",
        rps=2,
        accounts={"slow": ("sk-slow",), "fast": ("sk-fast",)},
        account_rps={"fast": {"z-image-turbo": 5}},
    )
    async with running_emulator(config) as emu:
        fast = await asyncio.gather(*(post(session, emu, key="sk-fast") for _ in range(7)))
        slow = await asyncio.gather(*(post(session, emu, key="sk-slow") for _ in range(4)))
        assert collections.Counter(s for s, _, _ in fast) == {200: 5, 429: 2}
        assert collections.Counter(s for s, _, _ in slow) == {200: 2, 429: 2}


async def test_quota_slides_and_ignores_refusals(session: aiohttp.ClientSession) -> None:
    config = EmulatorConfig(latency="0", rps=2, retry_after="1")
    async with running_emulator(config) as emu:
        started = time.monotonic()
        assert [(await post(session, emu))[0] for _ in range(2)] == [200, 200]
        status, _, _ = await post(session, emu, body(n=2))
        assert status == 400  # invalid requests neither count nor are throttled first
        await asyncio.sleep(0.5)
        refused = [await post(session, emu) for _ in range(2)]
        assert [status for status, _, _ in refused] == [429, 429]
        assert refused[0][2].headers["Retry-After"] == "1"
        await asyncio.sleep(max(0.0, started + 1.2 - time.monotonic()))
        assert [(await post(session, emu))[0] for _ in range(2)] == [200, 200]


# -- stats and control --------------------------------------------------------------------------


async def test_stats(emu: Emulator, session: aiohttp.ClientSession) -> None:
    await post(session, emu, key=None)
    _, first, _ = await post(session, emu, body("same", seed=5))
    await post(session, emu, body("same", seed=5))
    await post(session, emu, body("same", seed=6))
    await post(session, emu, body("same", n=4))
    url = image_url(first)
    await download(session, url)
    await download(session, url)
    await download(session, url.replace("Expires=", "Expires=1"))
    stats = emu.stats()
    assert stats["generate_requests"] == 5
    assert stats["images_billed"] == 3
    assert stats["duplicate_billed"] == 1
    assert stats["downloads"] == 3
    assert stats["by_status"] == {"401": 1, "200": 3, "400": 1}
    assert stats["download_by_status"] == {"200": 2, "403": 1}
    assert stats["seed"] == 1
    async with session.get(emu.root_url + "/_emulator/stats") as response:
        assert await response.json() == stats


async def test_reconfigure_in_process_and_over_http(
    emu: Emulator, session: aiohttp.ClientSession
) -> None:
    emu.reconfigure(faults="Arrearage=1")
    status, reply, _ = await post(session, emu)
    _assert_error(status, reply, 400, "Arrearage")
    assert reply["message"] == "Access denied, please make sure your account is in good standing."
    async with session.post(emu.root_url + "/_emulator/config", json={"faults": ""}) as response:
        assert response.status == 200
        assert (await response.json())["faults"] == ""
    assert (await post(session, emu))[0] == 200
    async with session.post(emu.root_url + "/_emulator/config", json={"rps": 1, "moderate": ["x"]}):
        pass
    assert emu.config.rps == 1.0 and emu.config.moderate == ("x",)
    for bad in ({"faults": "bogus=1"}, {"port": 80}, [1]):
        async with session.post(emu.root_url + "/_emulator/config", json=bad) as response:
            assert response.status == 400
            assert "error" in await response.json()
    async with session.post(emu.root_url + "/_emulator/config", data=b"{") as response:
        assert response.status == 400
    with pytest.raises(ValueError, match="unknown fault kind"):
        emu.reconfigure(faults="bogus=1")
    assert emu.config.faults == ""


async def test_config_endpoint_hides_the_key(session: aiohttp.ClientSession) -> None:
    async with (
        running_emulator(EmulatorConfig(api_key="sk-hidden-value")) as emu,
        session.get(emu.root_url + "/_emulator/config") as response,
    ):
        text = await response.text()
    assert "sk-hidden-value" not in text
    assert '"api_key_set": true' in text
