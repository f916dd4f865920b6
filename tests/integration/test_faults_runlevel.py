"""A run-level error (bad key, arrears, the free quota gone, ...) switched on
while other calls are in flight. The run stops claiming, the calls already in flight settle
(their images are recorded and saved, nothing is marked failed for the run's cause), and the
next run, once the cause is fixed, finishes with every image paid for once."""

from __future__ import annotations

import dataclasses
import time

import aiohttp
import anyio
import pytest

from batcher.client import DashScopeClient
from batcher.emulator import EmulatorConfig, running_emulator
from batcher.layout import RunLayout
from batcher.pool import Runner, StopReason
from jobs import JobStore, State
from tests.support import FAST, check_invariants, make_specs, run_once

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]


def in_flight(e) -> int:
    """Generation calls the emulator has taken and not yet answered (no faults: all billed)."""
    s = e.stats()
    return s["generate_requests"] - s["images_billed"]


async def until(condition) -> None:
    with anyio.fail_after(10):
        while True:
            if condition():
                return
            await anyio.sleep(0.005)


N = 30
LATENCY_MS = 150


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        pytest.param({"faults": "Arrearage=1"}, "Arrearage", id="arrearage"),
        pytest.param({"faults": "free-quota=1"}, "Throttling.AllocationQuota", id="free-quota"),
        pytest.param({"faults": "Model.AccessDenied=1"}, "Model.AccessDenied", id="no-access"),
    ],
)
async def test_a_run_level_error_mid_run_stops_it_and_loses_nothing_in_flight(
    tmp_path, change, cause
):
    layout = RunLayout(tmp_path / "run")
    store = await JobStore.open(layout.db)
    await store.import_specs(make_specs(N), source="test.csv")
    cfg = EmulatorConfig(latency=f"lognormal:{LATENCY_MS}:0.5", rps=100_000.0, seed=5)
    opts = dataclasses.replace(FAST, concurrency=8)
    async with store, running_emulator(cfg) as e:
        result = None
        runner = None

        async def go():
            nonlocal result, runner
            runner, result = await run_once(store, layout, e.base_url, options=opts)

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            # a few images done, and calls in flight
            await until(lambda: in_flight(e) >= 6 and e.stats()["images_billed"] >= 8)
            in_flight_at_switch = in_flight(e)
            switched = time.monotonic()
            e.reconfigure(**change)
        stopped_after = time.monotonic() - switched
        stats = await store.stats()
        s = e.stats()
        assert result is not None and result.reason is StopReason.ABORTED
        assert cause in (result.abort_message or "")
        assert in_flight_at_switch >= 6  # the error really arrived while calls were in flight
        # claiming stopped at once: the calls in flight settled within about one latency
        assert stopped_after < 4 * LATENCY_MS / 1000 + 1.0
        # nothing failed for a run-level cause, nothing left running, nothing lost in flight:
        # every image the service billed is saved and done
        assert stats.count(State.FAILED) == 0 and stats.count(State.RUNNING) == 0
        assert stats.count(State.GENERATED) == 0
        assert s["images_billed"] == stats.count(State.DONE) == stats.images_billed
        assert stats.count(State.DONE) + stats.count(State.PENDING) == N
        assert stats.count(State.PENDING) > 0
        # jobs refused for the run-level cause were given back without an attempt charged
        assert stats.attempts == stats.count(State.DONE)

        # the cause is fixed: the next run finishes, nothing paid twice
        e.reconfigure(faults="", latency="0")
        _, result2 = await run_once(store, layout, e.base_url, options=opts)
        stats = await store.stats()
        s = e.stats()
    assert result2.reason is StopReason.FINISHED
    assert stats.count(State.DONE) == N
    assert s["images_billed"] == N and s["duplicate_billed"] == 0
    assert check_invariants(layout.root) == {"done": N}


async def test_a_wrong_key_mid_run_stops_it_and_loses_nothing_in_flight(tmp_path):
    """The key revoked while calls are in flight (the emulator starts refusing it with 401)."""
    layout = RunLayout(tmp_path / "run")
    store = await JobStore.open(layout.db)
    await store.import_specs(make_specs(N), source="test.csv")
    # api_key cannot change while running, so flip a 401 fault on instead
    cfg = EmulatorConfig(latency=f"lognormal:{LATENCY_MS}:0.5", rps=100_000.0, seed=6)
    opts = dataclasses.replace(FAST, concurrency=8)
    async with store, running_emulator(cfg) as e:
        result = None

        async def go():
            nonlocal result
            _, result = await run_once(store, layout, e.base_url, options=opts)

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            await until(lambda: in_flight(e) >= 6 and e.stats()["images_billed"] >= 8)
            e.reconfigure(faults="InvalidApiKey=1")
        stats = await store.stats()
        s = e.stats()
    assert result is not None and result.reason is StopReason.ABORTED
    assert "InvalidApiKey" in (result.abort_message or "")
    assert "DASHSCOPE_API_KEY" in (result.abort_message or "")
    assert stats.count(State.FAILED) == 0 and stats.count(State.RUNNING) == 0
    assert s["images_billed"] == stats.count(State.DONE)
    check_invariants(layout.root)


async def test_calls_cut_short_by_a_hard_stop_are_counted_as_ambiguous(tmp_path):
    """A second Ctrl-C (or the grace period running out) cuts calls in flight short: the service
    still generates and bills them, their jobs go back to pending and are generated again next
    run. That is an answer lost in flight, the one case the README allows to be paid twice, and
    it says such re-sends are counted as ambiguous."""
    layout = RunLayout(tmp_path / "run")
    store = await JobStore.open(layout.db)
    await store.import_specs(make_specs(3), source="test.csv")
    cfg = EmulatorConfig(latency="400", rps=100_000.0, seed=7)
    async with store, running_emulator(cfg) as e:
        runner = None

        async def go():
            nonlocal runner
            async with aiohttp.ClientSession() as session:
                client = DashScopeClient(session, base_url=e.base_url, api_key="sk-test-key")
                runner = Runner(
                    store=store, client=client, session=session, layout=layout, options=FAST
                )
                await runner.run()

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            await until(lambda: e.stats()["generate_requests"] == 3)
            runner.cancel_in_flight()
        await anyio.sleep(0.6)  # the service finishes (and bills) the abandoned calls
        stats = await store.stats()
        billed_first = e.stats()["images_billed"]
        e.reconfigure(latency="0")
        await run_once(store, layout, e.base_url)
        final = await store.stats()
        s = e.stats()
    assert stats.count(State.PENDING) == 3 and stats.count(State.RUNNING) == 0
    assert billed_first == 3
    assert s["images_billed"] == 6  # each image paid twice: the first answers were abandoned
    assert final.count(State.DONE) == 3
    assert final.ambiguous == 3, "re-sends after abandoned calls are not counted as ambiguous"
    check_invariants(layout.root)
