"""The official ``dashscope`` SDK against the emulator: parsed successes and documented errors.

How dashscope 2.0.2 finds the server (read in its installed source): ``MultiModalConversation.call``
builds ``{base}/services/aigc/multimodal-generation/generation`` in
``api_entities/api_request_factory.py``, where ``base`` is the ``base_address`` keyword if given,
else the module attribute ``dashscope.base_http_api_url``. That attribute is initialised from the
``DASHSCOPE_HTTP_BASE_URL`` environment variable when ``dashscope.common.env`` is first imported,
so setting the variable afterwards has no effect; the tests set the attribute (and once pass
``base_address``). Calls go through a shared ``requests`` session, closed after each test.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import dashscope
import pytest
import requests
from dashscope import MultiModalConversation
from PIL import Image

from batcher.emulator import EmulatorConfig, EmulatorThread

KEY = "sk-sdk-test"
MESSAGES = [{"role": "user", "content": [{"text": "a lighthouse in a storm"}]}]


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorConfig(latency="0", rps=math.inf, seed=2)) as emulator:
        monkeypatch.setattr(dashscope, "base_http_api_url", emulator.base_url)
        try:
            yield emulator
        finally:
            dashscope.close_shared_sync_session()


def call(**kwargs: Any) -> Any:
    arguments: dict[str, Any] = {
        "model": "z-image-turbo",
        "messages": MESSAGES,
        "api_key": KEY,
        "size": "512*512",
    }
    arguments.update(kwargs)
    return MultiModalConversation.call(**arguments)


def test_success_is_parsed(emu: EmulatorThread) -> None:
    response = call(seed=42, prompt_extend=False)
    assert response.status_code == 200
    assert not response.code and not response.message
    assert len(response.request_id) == 36
    message = response.output.choices[0].message
    assert message.role == "assistant"
    assert message.reasoning_content == ""
    image, text = message.content
    assert text == {"text": "a lighthouse in a storm"}
    assert image["image"].startswith(emu.root_url + "/1d/")
    assert response.usage.width == 512 and response.usage.height == 512
    assert response.usage.image_count == 1
    assert response.usage.total_tokens == 0
    download = requests.get(image["image"], timeout=10)
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(download.content)).size == (512, 512)
    download.close()
    stats = emu.stats()
    assert (stats["generate_requests"], stats["images_billed"], stats["downloads"]) == (1, 1, 1)


def test_prompt_extend_is_parsed(emu: EmulatorThread) -> None:
    response = call(prompt_extend=True)
    assert response.status_code == 200
    message = response.output.choices[0].message
    assert message.reasoning_content
    assert message.content[1]["text"].startswith("a lighthouse in a storm")
    assert response.usage.output_tokens_details["reasoning_tokens"] > 0
    assert response.usage.total_tokens > 0


def test_base_address_keyword(emu: EmulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashscope, "base_http_api_url", "http://127.0.0.1:9/unused")
    response = call(base_address=emu.base_url)
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "message"),
    [
        ({"n": 2}, 400, "InvalidParameter", "num_images_per_prompt must be 1"),
        ({"size": "100*100"}, 400, "InvalidParameter", None),
        ({"seed": -5}, 400, "InvalidParameter", None),
        ({"model": "z-image-turbo-xl"}, 400, "InvalidParameter", "Model not exist."),
        ({"api_key": "not-a-key"}, 401, "InvalidApiKey", "Invalid API-key provided."),
        ({"headers": {"X-DashScope-Async": "enable"}}, 403, "AccessDenied", None),
    ],
)
def test_documented_errors(
    emu: EmulatorThread, kwargs: dict[str, Any], status: int, code: str, message: str | None
) -> None:
    response = call(**kwargs)
    assert response.status_code == status
    assert response.code == code
    assert response.message
    if message is not None:
        assert response.message == message
    assert len(response.request_id) == 36
    assert emu.stats()["images_billed"] == 0


def test_injected_errors_and_throttling(emu: EmulatorThread) -> None:
    emu.reconfigure(faults="Arrearage=1")
    response = call()
    assert (response.status_code, response.code) == (400, "Arrearage")
    emu.reconfigure(faults="500=1")
    response = call()
    assert (response.status_code, response.code) == (500, "InternalError")
    emu.reconfigure(faults="503=1")
    assert call().status_code == 503
    emu.reconfigure(faults="", rps=1)
    first, second = call(), call()
    assert first.status_code == 200
    assert (second.status_code, second.code) == (429, "Throttling.RateQuota")
    assert emu.stats()["by_status"] == {"400": 1, "500": 1, "503": 1, "200": 1, "429": 1}


def test_thread_start_failure_is_raised(emu: EmulatorThread) -> None:
    busy = EmulatorThread(EmulatorConfig(latency="0", port=emu.port))
    with pytest.raises(OSError):
        busy.start()
    with pytest.raises(RuntimeError, match="not running"):
        busy.stats()
