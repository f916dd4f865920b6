"""The runner against the real emulator on loopback and a real SQLite file: every outcome class."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from decimal import Decimal

import anyio
import pytest

from batcher.emulator import EmulatorConfig, running_emulator
from batcher.layout import RunLayout
from batcher.pool import StopReason
from jobs import JobStore, State
from tests.support import FAST, check_invariants, generate_only, make_specs, run_once

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]


def emu(**kw):
    base = {"latency": "0", "rps": 100_000.0, "seed": 3}
    base.update(kw)
    return EmulatorConfig(**base)


async def prepared(tmp_path, n, **spec_kw):
    layout = RunLayout(tmp_path / "run")
    store = await JobStore.open(layout.db)
    await store.import_specs(make_specs(n, **spec_kw), source="test.csv")
    return layout, store


async def test_clean_run_every_image_verified_and_billed_once(tmp_path):
    layout, store = await prepared(tmp_path, 40)
    async with store, running_emulator(emu()) as e:
        _runner, result = await run_once(store, layout, e.base_url)
        stats = await store.stats()
        assert result.reason is StopReason.FINISHED
        assert stats.count(State.DONE) == 40
        assert e.stats()["images_billed"] == 40
        assert e.stats()["duplicate_billed"] == 0
        assert stats.images_billed == 40
        assert stats.cost == Decimal("0.600")
        rec = await store.get("job-00003")
        assert rec["request_id"] and rec["width"] == 512 and rec["latency_ms"] > 0
        assert rec["attempts"] == 1 and rec["finished_at"] >= rec["generated_at"]
        # a second run calls nothing
        runner2, _result2 = await run_once(store, layout, e.base_url)
        assert runner2.counters.calls == 0
        assert e.stats()["generate_requests"] == 40
    assert check_invariants(layout.root) == {"done": 40}


async def test_transient_errors_are_retried_and_counted(tmp_path):
    layout, store = await prepared(tmp_path, 60)
    async with store, running_emulator(emu(faults="500=0.2,503=0.1", seed=11)) as e:
        runner, _result = await run_once(
            store, layout, e.base_url, options=dataclasses.replace(FAST, max_attempts=10)
        )
        stats = await store.stats()
    assert stats.count(State.DONE) == 60
    assert runner.counters.retries > 0
    assert stats.attempts == 60 + runner.counters.retries
    assert e.stats()["images_billed"] == 60
    check_invariants(layout.root)


async def test_throttling_does_not_use_up_attempts(tmp_path):
    layout, store = await prepared(tmp_path, 30)
    async with store, running_emulator(emu(faults="429=0.5", seed=5)) as e:
        opts = dataclasses.replace(FAST, max_attempts=1)  # a single real failure would fail a job
        runner, _result = await run_once(store, layout, e.base_url, options=opts)
        stats = await store.stats()
    assert stats.count(State.DONE) == 30
    assert runner.counters.throttled > 0 and stats.throttled == runner.counters.throttled
    assert stats.attempts == 30  # only the successful calls were charged


async def test_permanent_errors_fail_the_job_at_once(tmp_path):
    layout, store = await prepared(tmp_path, 10)
    async with store, running_emulator(emu(moderate=("number 3 ",))) as e:
        _runner, result = await run_once(store, layout, e.base_url)
        stats = await store.stats()
        failed = await store.get("job-00003")
    assert stats.count(State.DONE) == 9 and stats.count(State.FAILED) == 1
    assert failed["error_code"] == "DataInspectionFailed" and failed["attempts"] == 1
    assert failed["request_id"]
    assert result.reason is StopReason.FINISHED
    assert stats.errors_by_code == {"DataInspectionFailed": 1}
    assert e.stats()["generate_requests"] == 10  # never retried


async def test_run_level_error_stops_the_run_and_fails_nothing(tmp_path):
    layout, store = await prepared(tmp_path, 30)
    async with store, running_emulator(emu(faults="Arrearage=1")) as e:
        _runner, result = await run_once(store, layout, e.base_url)
        stats = await store.stats()
    assert result.reason is StopReason.ABORTED
    assert "Arrearage" in (result.abort_message or "")
    assert stats.count(State.FAILED) == 0 and stats.count(State.RUNNING) == 0
    assert stats.count(State.PENDING) == 30 and stats.attempts == 0
    # stopped claiming quickly: far fewer calls than jobs
    assert e.stats()["generate_requests"] <= FAST.concurrency + 1


async def test_wrong_key_stops_the_run(tmp_path):
    layout, store = await prepared(tmp_path, 5)
    async with store, running_emulator(emu(api_key="sk-the-right-one")) as e:
        _runner, result = await run_once(store, layout, e.base_url, api_key="sk-wrong")
        stats = await store.stats()
    assert result.reason is StopReason.ABORTED and "InvalidApiKey" in result.abort_message
    assert stats.count(State.PENDING) == 5


async def test_broken_downloads_are_retried_without_paying_again(tmp_path):
    layout, store = await prepared(tmp_path, 40)
    async with store, running_emulator(emu(faults="truncate=0.25,corrupt=0.25", seed=9)) as e:
        opts = dataclasses.replace(FAST, max_attempts=12)
        runner, _result = await run_once(store, layout, e.base_url, options=opts)
        stats = await store.stats()
        s = e.stats()
    assert stats.count(State.DONE) == 40
    assert s["images_billed"] == 40 and s["downloads"] > 40
    assert runner.counters.download_retries == s["downloads"] - 40
    check_invariants(layout.root)


async def test_generated_but_not_downloaded_is_downloaded_without_a_new_call(tmp_path):
    layout, store = await prepared(tmp_path, 6)
    async with store, running_emulator(emu()) as e:
        await generate_only(store, e.base_url, 6)
        assert (await store.stats()).count(State.GENERATED) == 6
        runner, _result = await run_once(store, layout, e.base_url)
        assert runner.counters.calls == 0 and runner.counters.done == 6
        assert e.stats()["images_billed"] == 6
    check_invariants(layout.root)


async def test_expired_urls_are_generated_again_and_counted(tmp_path):
    layout, store = await prepared(tmp_path, 5)
    async with store, running_emulator(emu(url_ttl=0.5)) as e:
        await generate_only(store, e.base_url, 5)
        await anyio.sleep(0.6)
        e.reconfigure(url_ttl=86400.0)
        runner, _result = await run_once(store, layout, e.base_url)
        stats = await store.stats()
    assert stats.count(State.DONE) == 5
    assert runner.counters.regenerated == 5 and stats.regenerated == 5
    assert stats.images_billed == 10 and e.stats()["images_billed"] == 10
    check_invariants(layout.root)


async def test_storage_403_before_the_recorded_expiry_regenerates(tmp_path):
    layout, store = await prepared(tmp_path, 3)
    async with store, running_emulator(emu(url_ttl=0.3)) as e:
        await generate_only(store, e.base_url, 3)
        # pretend the URLs were still valid by our clock: only storage says otherwise
        con = sqlite3.connect(layout.db)
        con.execute("UPDATE jobs SET url_expires_at = ?", (time.time() + 3600,))
        con.commit()
        con.close()
        await anyio.sleep(0.4)
        e.reconfigure(url_ttl=86400.0)
        _runner, _result = await run_once(store, layout, e.base_url)
        stats = await store.stats()
    assert stats.count(State.DONE) == 3 and stats.regenerated == 3
    check_invariants(layout.root)


async def test_budget_and_limit_stop_claiming(tmp_path):
    layout, store = await prepared(tmp_path, 20)
    async with store, running_emulator(emu()) as e:
        from decimal import Decimal

        opts = dataclasses.replace(FAST, budget=Decimal("0.10"), concurrency=1)
        runner, result = await run_once(store, layout, e.base_url, options=opts)
        assert result.reason is StopReason.BUDGET
        assert runner.counters.cost <= Decimal("0.10")
        assert runner.counters.generated == 6  # 6 x 0.015 = 0.09; a 7th would pass 0.10
        opts = dataclasses.replace(FAST, limit=4)
        runner, result = await run_once(store, layout, e.base_url, options=opts)
        assert result.reason is StopReason.LIMIT and runner.counters.generated == 4
        stats = await store.stats()
    assert stats.count(State.DONE) == 10 and stats.count(State.PENDING) == 10
    assert stats.count(State.RUNNING) == 0


async def test_lost_answers_are_counted_as_ambiguous(tmp_path):
    layout, store = await prepared(tmp_path, 40)
    async with store, running_emulator(emu(faults="lost=0.2,reset=0.1", seed=21)) as e:
        opts = dataclasses.replace(FAST, max_attempts=12)
        runner, _result = await run_once(store, layout, e.base_url, options=opts)
        stats = await store.stats()
        s = e.stats()
    assert stats.count(State.DONE) == 40
    lost = s["faults_injected"].get("lost", 0)
    assert lost > 0
    assert s["images_billed"] == 40 + lost  # every extra generation is a lost answer
    assert runner.counters.ambiguous >= lost
    check_invariants(layout.root)


async def test_the_achieved_rate_spans_from_the_first_call_sent_not_the_first_answered(tmp_path):
    """The first call answered last (a slow answer): the achieved rate is still measured from
    the first call *sent*. Measured from the first answered, the span lost the slow call's head
    start and a run paced under its quota printed more than 100% of it."""
    from aiohttp import ClientSession, web

    from tests.support import serving

    layout, store = await prepared(tmp_path, 8)
    async with store, running_emulator(emu()) as e, ClientSession() as session:
        seen = 0

        async def api(request: web.Request) -> web.Response:
            nonlocal seen
            seen += 1
            if seen == 1:
                await anyio.sleep(1.5)  # the first call sent is answered after all the others
            body = await request.read()
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            async with session.post(e.root_url + request.path_qs, data=body, headers=headers) as up:
                return web.Response(
                    status=up.status, body=await up.read(), content_type="application/json"
                )

        app = web.Application()
        app.router.add_post("/api/v1/{tail:.*}", api)
        async with serving(app) as url:
            options = dataclasses.replace(FAST, rps=4.0)  # sends 0.25 s apart
            _runner, result = await run_once(store, layout, url + "/api/v1", options=options)
    assert result.counters.accepted == 8
    rate = result.accepted_per_second
    assert rate is not None and rate <= 4.0, rate
