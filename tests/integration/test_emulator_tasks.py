"""The emulator's asynchronous task API and its per-model checks, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from batcher.emulator import Emulator, EmulatorConfig, running_emulator

pytestmark = pytest.mark.anyio

KEY = "sk-task-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASYNC = {**AUTH, "X-DashScope-Async": "enable"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def task_body(model: str = "wan2.2-t2i-flash", **parameters: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input": {"prompt": "a red fox in the snow", "negative_prompt": "blurry"},
        "parameters": {"size": "1024*1024", "n": 1, **parameters},
    }


async def create(
    session: aiohttp.ClientSession, emu: Emulator, body: dict[str, Any], headers: Any = None
) -> tuple[int, dict[str, Any]]:
    url = emu.base_url + "/services/aigc/text2image/image-synthesis"
    async with session.post(url, json=body, headers=headers or ASYNC) as resp:
        return resp.status, await resp.json()


async def poll(session: aiohttp.ClientSession, emu: Emulator, task_id: str) -> dict[str, Any]:
    async with session.get(f"{emu.base_url}/tasks/{task_id}", headers=AUTH) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def wait(session: aiohttp.ClientSession, emu: Emulator, task_id: str) -> dict[str, Any]:
    for _ in range(200):
        body = await poll(session, emu, task_id)
        if body["output"]["task_status"] not in ("PENDING", "RUNNING"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError("the task never ended")


def config(**changes: Any) -> EmulatorConfig:
    settings: dict[str, Any] = {"latency": "0", "rps": math.inf, "seed": 3, "task_seconds": "0.4"}
    settings.update(changes)
    return EmulatorConfig(**settings)


async def test_a_task_goes_pending_running_succeeded_and_bills_each_image(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(config()) as emu:
        status, created = await create(session, emu, task_body(n=3, seed=10))
        assert status == 200
        assert created["output"]["task_status"] == "PENDING"
        task_id = created["output"]["task_id"]
        seen = [(await poll(session, emu, task_id))["output"]["task_status"]]
        done = await wait(session, emu, task_id)
        seen.append(done["output"]["task_status"])
        assert seen[0] == "PENDING" and seen[-1] == "SUCCEEDED"
        results = done["output"]["results"]
        assert len(results) == 3 and all(r["url"].startswith("http://") for r in results)
        assert done["usage"] == {"image_count": 3}
        assert done["output"]["task_metrics"] == {"TOTAL": 3, "SUCCEEDED": 3, "FAILED": 0}
        async with session.get(results[0]["url"]) as image:
            assert image.status == 200
            assert (await image.read())[:8] == b"\x89PNG\r\n\x1a\n"
        stats = emu.stats()
        assert stats["tasks_created"] == 1
        assert stats["task_polls"] >= 2
        assert stats["images_billed_by_model"] == {"wan2.2-t2i-flash": 3}
        assert stats["duplicate_billed"] == 0


async def test_the_create_needs_the_async_header_and_a_task_model(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(config()) as emu:
        status, body = await create(session, emu, task_body(), headers=AUTH)
        assert (status, body["code"]) == (403, "AccessDenied")
        status, body = await create(session, emu, task_body("z-image-turbo"))
        assert (status, body["message"]) == (400, "Model not exist.")
        status, body = await create(session, emu, task_body(n=5))
        assert (status, body["code"]) == (400, "InvalidParameter")
        assert "n must be an integer in [1, 4]" in body["message"]
        status, body = await create(session, emu, task_body(size="2048*1024"))
        assert status == 400 and "valid sizes of wan2.2-t2i-flash" in body["message"]
        status, body = await create(session, emu, task_body("wan2.5-t2i-preview", size="768*2700"))
        assert status == 200
        assert emu.stats()["tasks_created"] == 1


async def test_the_concurrent_task_limit_refuses_a_third_flash_task(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(config(task_seconds="0.5")) as emu:
        first = [await create(session, emu, task_body()) for _ in range(2)]
        assert [status for status, _ in first] == [200, 200]
        status, body = await create(session, emu, task_body())
        assert (status, body["code"]) == (429, "Throttling")
        assert "allows 2 at a time" in body["message"]
        await wait(session, emu, first[0][1]["output"]["task_id"])
        status, _ = await create(session, emu, task_body())
        assert status == 200
        assert emu.stats()["tasks_created"] == 3


async def test_cancel_only_while_pending_and_unknown_after_the_ttl(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(config(task_seconds="2", task_ttl=0.6)) as emu:
        _, created = await create(session, emu, task_body())
        task_id = created["output"]["task_id"]
        async with session.post(f"{emu.base_url}/tasks/{task_id}/cancel", headers=AUTH) as resp:
            assert resp.status == 200
        assert (await poll(session, emu, task_id))["output"]["task_status"] == "CANCELED"
        _, other = await create(session, emu, task_body())
        other_id = other["output"]["task_id"]
        await asyncio.sleep(0.7)  # past its PENDING quarter (0.5 s) and past the ttl
        body = await poll(session, emu, other_id)
        assert body["output"] == {"task_id": other_id, "task_status": "UNKNOWN"}
        stats = emu.stats()
        assert stats["tasks_cancelled"] == 1
        assert stats["images_billed_by_model"] == {}


async def test_faults_on_create_poll_and_task_outcome(session: aiohttp.ClientSession) -> None:
    async with running_emulator(config(faults="lost=1")) as emu:
        with pytest.raises(aiohttp.ClientError):
            await create(session, emu, task_body())
        assert emu.stats()["tasks_created"] == 1  # created and billed, the answer lost
    async with running_emulator(config(faults="task-failed=1")) as emu:
        _, created = await create(session, emu, task_body())
        done = await wait(session, emu, created["output"]["task_id"])
        assert done["output"]["task_status"] == "FAILED"
        assert done["output"]["code"] == "InternalError.Algo"
        assert "usage" not in done
    async with running_emulator(config(faults="task-partial=1")) as emu:
        _, created = await create(session, emu, task_body(n=2))
        done = await wait(session, emu, created["output"]["task_id"])
        assert done["output"]["task_status"] == "SUCCEEDED"
        good, bad = done["output"]["results"]
        assert "url" in good and bad["code"] == "InternalError.Algo"
        assert done["usage"] == {"image_count": 1}
    async with running_emulator(config(faults="poll-500=1")) as emu:
        _, created = await create(session, emu, task_body())
        url = f"{emu.base_url}/tasks/{created['output']['task_id']}"
        async with session.get(url, headers=AUTH) as resp:
            assert resp.status == 500


async def test_quotas_are_per_model(session: aiohttp.ClientSession) -> None:
    async with running_emulator(config(rps=2.0)) as emu:
        statuses = [
            (await create(session, emu, task_body("wan2.5-t2i-preview", size="1280*1280")))[0]
            for _ in range(6)
        ]
        # wan2.5-t2i-preview: 5 a second (and 5 at once); z-image-turbo's quota is untouched
        assert statuses[:5] == [200] * 5 and statuses[5] == 429
        url = emu.base_url + "/services/aigc/multimodal-generation/generation"
        sync = {
            "model": "qwen-image",
            "input": {"messages": [{"role": "user", "content": [{"text": "poster"}]}]},
        }
        async with session.post(url, json=sync, headers=AUTH) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["output"]["choices"][0]["message"]["content"][0]["image"]
        assert len(answer["output"]["choices"][0]["message"]["content"]) == 1
        assert answer["usage"]["width"] == 1328
