"""A run over asynchronous task models (Wan) and mixed manifests, against the emulator.

The task is created once, its id committed (``submitted``) before anything else; a run cut
short leaves it submitted and the next run polls the same task instead of creating another.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import aiohttp
import anyio
import pytest

from batcher.client import DashScopeClient
from batcher.emulator import EmulatorConfig, running_emulator
from batcher.lanes import Lane
from batcher.layout import RunLayout
from batcher.pool import RunLane, Runner, RunResult, StopReason
from jobs import JobSpec, JobStore, State

from ..support import FAST, check_invariants, make_specs, run_once

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]

TASKS = dataclasses.replace(FAST, concurrency=16, lease_seconds=30.0)


def wan_specs(
    n: int, *, model: str = "wan2.2-t2i-flash", prefix: str = "wan", size: str = "512*512"
) -> list[JobSpec]:
    return [
        replace(s, model=model, prompt_extend=True) for s in make_specs(n, size=size, prefix=prefix)
    ]


async def test_task_jobs_are_created_once_polled_and_downloaded(tmp_path) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=11, task_seconds="0.6")
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan_specs(6) + make_specs(4), source="m.csv")
        runner, result = await run_once(store, layout, emu.base_url, options=TASKS)
        assert result.reason is StopReason.FINISHED
        stats = await store.stats()
        assert stats.count(State.DONE) == 10
        s = emu.stats()
        assert s["tasks_created"] == 6 == runner.counters.tasks_created
        assert s["images_billed_by_model"] == {"wan2.2-t2i-flash": 6, "z-image-turbo": 4}
        assert s["duplicate_billed"] == 0
        # polls: a 0.6 s task is seen ended at its third or fourth poll
        assert s["task_polls"] <= 6 * 4
        record = await store.get("wan-00000")
        assert record is not None and record["task_id"] and record["billed"] == 1
    check_invariants(layout.root)


async def test_the_concurrent_task_limit_is_kept(tmp_path) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=12, task_seconds="0.5")
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan_specs(8), source="m.csv")
        _, result = await run_once(store, layout, emu.base_url, options=TASKS)
        assert result.reason is StopReason.FINISHED
        s = emu.stats()
        # the emulator refuses a third flash task at once with 429: none was refused
        assert s["throttled"] == 0
        assert s["tasks_created"] == 8
    check_invariants(layout.root)


async def test_an_interrupted_run_reattaches_to_its_tasks_and_creates_none_again(tmp_path) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=13, task_seconds="1.5")
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        specs = wan_specs(2, model="wan2.5-t2i-preview", size="768*768")
        await store.import_specs(specs, source="m.csv")
        first = None

        async def go() -> None:
            nonlocal first
            first = await run_once(store, layout, emu.base_url, options=TASKS)

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            with anyio.fail_after(10):
                while emu.stats()["tasks_created"] < 2:  # noqa: ASYNC110 - polls a counter
                    await anyio.sleep(0.02)
            await anyio.sleep(0.1)
            assert first is None
            tg.cancel_scope.cancel()  # Ctrl-C: the tasks go on at the service
        stats = await store.stats()
        assert stats.count(State.SUBMITTED) == 2
        assert emu.stats()["tasks_cancelled"] == 0
        runner, result = await run_once(store, layout, emu.base_url, options=TASKS)
        assert result.reason is StopReason.FINISHED
        assert runner.counters.tasks_reattached == 2
        assert runner.counters.tasks_created == 0
        assert emu.stats()["tasks_created"] == 2
        assert (await store.stats()).count(State.DONE) == 2
        assert emu.stats()["duplicate_billed"] == 0
    check_invariants(layout.root)


async def test_failed_and_unknown_tasks(tmp_path) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(
        latency="0", rps=math.inf, seed=14, task_seconds="0.3", faults="task-failed=1"
    )
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan_specs(2), source="m.csv")
        options = dataclasses.replace(TASKS, max_attempts=2)
        _, result = await run_once(store, layout, emu.base_url, options=options)
        assert result.reason is StopReason.FINISHED
        stats = await store.stats()
        # InternalError.Algo is transient: retried once (a new task), then failed
        assert stats.count(State.FAILED) == 2
        assert emu.stats()["tasks_created"] == 4
        record = await store.get("wan-00000")
        assert record is not None and record["error_code"] == "InternalError.Algo"
        assert emu.stats()["images_billed"] == 0
    layout2 = RunLayout(tmp_path / "run2")
    cfg2 = EmulatorConfig(latency="0", rps=math.inf, seed=15, task_seconds="5", task_ttl=0.5)
    async with await JobStore.open(layout2.db) as store, running_emulator(cfg2) as emu:
        await store.import_specs(wan_specs(1), source="m.csv")
        options = dataclasses.replace(TASKS, max_attempts=3)
        await run_once(store, layout2, emu.base_url, options=options)
        record = await store.get("wan-00000")
        # the service forgot every task before it ended: created again each time, then given up
        assert record is not None and record["state"] == "failed"
        assert record["regenerated"] >= 2 and record["error_code"] == "TaskUnknown"


async def run_on_lanes(
    store: JobStore, layout: RunLayout, base_url: str, keys: dict[str, str]
) -> tuple[Runner, RunResult]:
    """A run over several lanes (one client each, one shared session), in ``keys``' order."""
    async with aiohttp.ClientSession() as session:
        lanes = [
            RunLane(
                lane=Lane(name=name, key_env=f"KEY_{name.upper()}", quota=100.0),
                client=DashScopeClient(session, base_url=base_url, api_key=key),
                endpoint=base_url,
            )
            for name, key in keys.items()
        ]
        runner = Runner(
            store=store,
            client=lanes[0].client,
            session=session,
            layout=layout,
            options=TASKS,
            lanes=lanes,
        )
        return runner, await runner.run()


async def test_a_task_is_polled_with_the_key_of_the_lane_that_created_it(tmp_path) -> None:
    """A task belongs to its account: after an interruption, the next run polls each task on
    the lane recorded with it (the other account's key would find no such task and make it
    again, paid twice)."""
    layout = RunLayout(tmp_path / "run")
    accounts = {"acct-a": ("sk-task-a",), "acct-b": ("sk-task-b",)}
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=16, task_seconds="1.5", accounts=accounts)
    keys = {"a": "sk-task-a", "b": "sk-task-b"}
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan_specs(4), source="m.csv")
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_on_lanes, store, layout, emu.base_url, keys)
            with anyio.fail_after(10):
                while emu.stats()["tasks_created"] < 4:  # noqa: ASYNC110 - polls a counter
                    await anyio.sleep(0.02)
            await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        records = [await store.get(f"wan-{i:05d}") for i in range(4)]
        assert {r["lane"] for r in records if r} == {"a", "b"}
        assert all(r and r["state"] == "submitted" for r in records)
        reverse = dict(reversed(keys.items()))
        runner, result = await run_on_lanes(store, layout, emu.base_url, reverse)
        assert result.reason is StopReason.FINISHED
        assert runner.counters.tasks_reattached == 4 and runner.counters.regenerated == 0
        assert emu.stats()["tasks_created"] == 4
        assert (await store.stats()).count(State.DONE) == 4
    check_invariants(layout.root)
