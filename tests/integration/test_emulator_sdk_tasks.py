"""The official ``dashscope`` SDK's asynchronous image API against the emulator.

``ImageSynthesis.async_call`` posts to ``{base}/services/aigc/text2image/image-synthesis`` with
``X-DashScope-Async: enable``; ``fetch`` and ``wait`` read ``{base}/tasks/{id}`` (``wait``
polls from 1 s, doubling every third poll up to 5 s) and ``cancel`` posts to
``{base}/tasks/{id}/cancel``; ``base`` is ``dashscope.base_http_api_url`` (see
``test_emulator_sdk.py`` for why the attribute, not the environment variable, is set).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import dashscope
import pytest
import requests
from dashscope import ImageSynthesis

from batcher.emulator import EmulatorConfig, EmulatorThread

KEY = "sk-sdk-task-test"


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    config = EmulatorConfig(latency="0", rps=math.inf, seed=5, task_seconds="0.5")
    with EmulatorThread(config) as emulator:
        monkeypatch.setattr(dashscope, "base_http_api_url", emulator.base_url)
        try:
            yield emulator
        finally:
            dashscope.close_shared_sync_session()


def test_async_call_then_wait_gives_the_images(emu: EmulatorThread) -> None:
    task = ImageSynthesis.async_call(
        model="wan2.2-t2i-flash",
        prompt="a lighthouse in a storm",
        negative_prompt="blurry",
        n=2,
        size="1024*1024",
        seed=7,
        api_key=KEY,
    )
    assert task.status_code == 200, task
    assert task.output.task_status == "PENDING"
    fetched = ImageSynthesis.fetch(task, api_key=KEY)
    assert fetched.status_code == 200
    assert fetched.output.task_id == task.output.task_id
    assert fetched.output.task_status in ("PENDING", "RUNNING")
    done = ImageSynthesis.wait(task, api_key=KEY)
    assert done.status_code == 200
    assert done.output.task_status == "SUCCEEDED"
    assert len(done.output.results) == 2
    assert done.usage.image_count == 2
    image = requests.get(done.output.results[0].url, timeout=10)
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    stats = emu.stats()
    assert stats["tasks_created"] == 1
    assert stats["images_billed_by_model"] == {"wan2.2-t2i-flash": 2}


def test_a_refused_create_is_an_sdk_error_response(emu: EmulatorThread) -> None:
    response = ImageSynthesis.async_call(
        model="wan2.2-t2i-plus", prompt="x", n=9, size="1024*1024", api_key=KEY
    )
    assert response.status_code == 400
    assert response.code == "InvalidParameter"
    assert emu.stats()["tasks_created"] == 0


def test_cancel_a_pending_task(emu: EmulatorThread) -> None:
    emu.reconfigure(task_seconds="20")
    task = ImageSynthesis.async_call(
        model="wan2.5-t2i-preview", prompt="a quiet harbour", n=1, api_key=KEY
    )
    assert task.status_code == 200
    canceled = ImageSynthesis.cancel(task, api_key=KEY)
    assert canceled.status_code == 200
    assert ImageSynthesis.fetch(task, api_key=KEY).output.task_status == "CANCELED"
    assert emu.stats()["tasks_cancelled"] == 1
