"""Every network fault ends as the README's error table says, with attempts counted as it
says. The real emulator on loopback and a real SQLite file; the emulator's seeded draws are
searched for a seed that gives exactly the sequence of faults a test wants, so each streak is
deterministic (the n-th generation request and the n-th download each get a fixed draw)."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from email.utils import formatdate

import anyio
import pytest

from batcher.emulator import EmulatorConfig, running_emulator
from batcher.emulator.config import parse_faults
from batcher.emulator.faults import draw
from batcher.layout import RunLayout
from batcher.pool import StopReason
from jobs import JobStore, State
from tests.support import (
    FAST,
    ImageRelay,
    check_invariants,
    generate_only,
    make_specs,
    run_once,
    serving,
)

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]


def seed_for(faults: str, kinds: list[str | None], *, stream: str = "generate") -> int:
    """An emulator seed whose first ``len(kinds)`` draws of ``stream`` pick exactly ``kinds``
    (None: no fault), so a single job meets that streak and then the next draw's outcome."""
    plan = parse_faults(faults)
    pick = plan.pick_generation if stream == "generate" else plan.pick_download
    for seed in range(200_000):
        got = []
        for n in range(len(kinds)):
            rule = pick(draw(seed, stream, n).fault_u)
            got.append(rule.kind if rule else None)
        if got == kinds:
            return seed
    raise AssertionError(f"no seed gives {kinds} for {faults}")


def emu(**kw):
    base = {"latency": "0", "rps": 100_000.0, "seed": 3}
    base.update(kw)
    return EmulatorConfig(**base)


async def one_job(tmp_path, *, size: str = "512*512"):
    layout = RunLayout(tmp_path / "run")
    store = await JobStore.open(layout.db)
    await store.import_specs(make_specs(1, size=size), source="test.csv")
    return layout, store


# -------------------------------------------------------------------- generation call faults

STREAKS = [
    # faults, the sequence of draws, max_attempts, then what the job must end as:
    # state, error code, attempts, ambiguous re-sends, images the emulator billed
    pytest.param("500=0.5", ["500", "500", None], 5, "done", None, 3, 0, 1, id="500-then-ok"),
    pytest.param(
        "503=0.5", ["503"] * 5, 5, "failed", "ModelUnavailable", 5, 0, 0, id="503-exhausts"
    ),
    pytest.param(
        "500=0.4,503=0.4",
        ["500", "503", "503", "500", None],
        5,
        "done",
        None,
        5,
        0,
        1,
        id="500-503-streak-then-ok-on-last-attempt",
    ),
    pytest.param("reset=0.5", ["reset", "reset", None], 5, "done", None, 3, 2, 1, id="resets"),
    pytest.param("lost=0.5", ["lost", "lost", None], 5, "done", None, 3, 2, 3, id="lost-answers"),
    # every one of the three calls may have been billed: all three are ambiguous
    pytest.param(
        "lost=0.5", ["lost"] * 3, 3, "failed", "transport.reset", 3, 3, 3, id="lost-exhausts"
    ),
]


@pytest.mark.parametrize(
    ("faults", "kinds", "max_attempts", "state", "code", "attempts", "ambiguous", "billed"),
    STREAKS,
)
async def test_generation_fault_streaks_end_as_the_table_says(
    tmp_path, faults, kinds, max_attempts, state, code, attempts, ambiguous, billed
):
    layout, store = await one_job(tmp_path)
    seed = seed_for(faults, kinds)
    async with store, running_emulator(emu(faults=faults, seed=seed)) as e:
        opts = dataclasses.replace(FAST, max_attempts=max_attempts)
        runner, result = await run_once(store, layout, e.base_url, options=opts)
        rec = await store.get("job-00000")
        stats = await store.stats()
        s = e.stats()
    assert result.reason is StopReason.FINISHED
    assert rec["state"] == state, rec
    assert rec["attempts"] == attempts
    assert s["generate_requests"] == len(kinds)
    assert rec["ambiguous"] == ambiguous == runner.counters.ambiguous
    assert s["images_billed"] == billed
    # The database bills only what it got an answer for; the rest is counted as ambiguous.
    assert rec["billed"] == (1 if state == "done" else 0)
    assert s["duplicate_billed"] == max(0, billed - 1)
    if state == "failed":
        assert rec["error_code"] == code
        assert f"gave up after {max_attempts} attempts" in rec["error_message"]
        assert stats.errors_by_code == {code: 1}
    else:
        assert rec["error_code"] is None
        assert runner.counters.retries == len(kinds) - 1
    check_invariants(layout.root)


async def test_a_hang_past_the_request_timeout_is_retried_as_ambiguous(tmp_path):
    layout, store = await one_job(tmp_path)
    seed = seed_for("hang=0.5", ["hang", "hang", None])
    async with store, running_emulator(emu(faults="hang=0.5", seed=seed)) as e:
        opts = dataclasses.replace(FAST, request_timeout=0.3)
        t0 = time.monotonic()
        runner, _ = await run_once(store, layout, e.base_url, options=opts)
        took = time.monotonic() - t0
        rec = await store.get("job-00000")
        s = e.stats()
    assert rec["state"] == "done" and rec["attempts"] == 3
    assert rec["ambiguous"] == 2 and runner.counters.ambiguous == 2
    assert took >= 0.6  # two full timeouts: the calls were not given up early
    assert took < 5  # ... nor left hanging
    assert s["generate_requests"] == 3 and s["images_billed"] == 1
    check_invariants(layout.root)


async def test_a_hang_on_every_attempt_fails_the_job_with_the_timeout_code(tmp_path):
    layout, store = await one_job(tmp_path)
    async with store, running_emulator(emu(faults="hang=1")) as e:
        opts = dataclasses.replace(FAST, request_timeout=0.2, max_attempts=2)
        _, result = await run_once(store, layout, e.base_url, options=opts)
        rec = await store.get("job-00000")
    assert result.reason is StopReason.FINISHED
    assert rec["state"] == "failed" and rec["error_code"] == "transport.timeout"
    assert rec["attempts"] == 2 and rec["ambiguous"] == 2
    check_invariants(layout.root)


# ------------------------------------------------------------------------------- Retry-After

PAST = "Wed, 21 Oct 2015 07:28:00 GMT"


def _in(seconds: float) -> str:
    return formatdate(time.time() + seconds, usegmt=True)


@pytest.mark.parametrize(
    ("header", "low", "high"),
    [
        pytest.param(lambda: "1", 0.95, 1.3, id="seconds"),
        # an HTTP date has whole seconds: "in 2 s" is between 1 and 2 s away once sent
        pytest.param(lambda: _in(2.0), 0.95, 2.3, id="http-date"),
        pytest.param(lambda: PAST, 0.0, 0.3, id="past-date"),
        pytest.param(lambda: "soon, maybe", 0.0, 1.3, id="garbage"),
        pytest.param(lambda: "-5", 0.0, 1.3, id="negative"),
        pytest.param(lambda: None, 0.0, 1.3, id="absent"),
    ],
)
async def test_retry_after_is_honoured_and_throttling_costs_no_attempt(tmp_path, header, low, high):
    layout, store = await one_job(tmp_path)
    seed = seed_for("429=0.5", ["429", None])
    async with store, running_emulator(emu(faults="429=0.5", seed=seed)) as e:
        e.reconfigure(retry_after=header())
        opts = dataclasses.replace(FAST, max_attempts=1)  # an attempt used up would fail the job
        t0 = time.time()
        runner, _ = await run_once(store, layout, e.base_url, options=opts)
        rec = await store.get("job-00000")
        s = e.stats()
    assert rec["state"] == "done" and rec["attempts"] == 1 and rec["throttled"] == 1
    assert runner.counters.throttled == 1 and runner.counters.retries == 0
    assert s["generate_requests"] == 2 and s["images_billed"] == 1
    waited = rec["next_attempt_at"] - t0  # the stored due time of the retry
    assert low <= waited <= high, waited
    assert rec["generated_at"] >= rec["next_attempt_at"]  # the retry waited for it
    check_invariants(layout.root)


async def test_a_huge_retry_after_is_clamped_stored_and_respected_by_a_restart(tmp_path):
    layout, store = await one_job(tmp_path)
    async with store, running_emulator(emu(faults="429=1", retry_after="999999999")) as e:

        async def go():
            await run_once(store, layout, e.base_url)

        t0 = time.time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            with anyio.fail_after(10):
                while True:
                    if (await store.get("job-00000"))["throttled"] >= 1:
                        break
                    await anyio.sleep(0.02)
            # the run keeps waiting for the job; stop it as a user would
            await anyio.sleep(0.3)
            assert e.stats()["generate_requests"] == 1
            tg.cancel_scope.cancel()
        rec = await store.get("job-00000")
        assert 299 <= rec["next_attempt_at"] - t0 <= 301  # clamped to 300 s, not 31 years
        assert rec["state"] == "pending" and rec["attempts"] == 0

        # A new run respects the stored due time: it calls nothing.
        e.reconfigure(faults="")
        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            await anyio.sleep(0.6)  # a run ignoring it would call within milliseconds
            tg.cancel_scope.cancel()
        assert e.stats()["generate_requests"] == 1
    check_invariants(layout.root)


# ------------------------------------------------------------------------- download faults


@pytest.mark.parametrize(
    ("faults", "kinds", "max_attempts", "state", "code"),
    [
        pytest.param("truncate=0.5", ["truncate", "truncate", None], 5, "done", None, id="trunc"),
        pytest.param(
            "corrupt=0.4,truncate=0.4",
            ["corrupt", "truncate", "corrupt", None],
            5,
            "done",
            None,
            id="corrupt-and-truncated",
        ),
        pytest.param(
            "truncate=1", ["truncate"] * 3, 3, "failed", "Download.truncated", id="trunc-exhausts"
        ),
        pytest.param(
            "corrupt=1", ["corrupt"] * 3, 3, "failed", "Download.corrupt", id="corrupt-exhausts"
        ),
    ],
)
async def test_download_fault_streaks_retry_the_download_only(
    tmp_path, faults, kinds, max_attempts, state, code
):
    layout, store = await one_job(tmp_path)
    seed = seed_for(faults, kinds, stream="download")
    async with store, running_emulator(emu(faults=faults, seed=seed)) as e:
        opts = dataclasses.replace(FAST, max_attempts=max_attempts)
        runner, _ = await run_once(store, layout, e.base_url, options=opts)
        rec = await store.get("job-00000")
        s = e.stats()
    assert rec["state"] == state, rec
    # one generation, paid once, however many downloads it took
    assert s["generate_requests"] == 1 and s["images_billed"] == 1 and rec["billed"] == 1
    assert rec["attempts"] == 1
    assert s["downloads"] == len(kinds)
    assert runner.counters.download_retries == len(kinds) - 1
    if state == "failed":
        assert rec["error_code"] == code
        assert not (layout.images / rec["output"]).exists()
    check_invariants(layout.root)


# --------------------------------------------------------------------- dead or expired URLs


async def test_urls_issued_already_expired_do_not_loop_on_paid_generations(tmp_path):
    """A service (or a clock) that hands out URLs already past their expiry: regenerating is
    the table's answer, but it must not go on paying for new images without end."""
    layout, store = await one_job(tmp_path)
    async with store, running_emulator(emu(url_ttl=-60)) as e:
        opts = dataclasses.replace(FAST, max_attempts=3)
        with anyio.move_on_after(3) as scope:
            _, result = await run_once(store, layout, e.base_url, options=opts)
        billed = e.stats()["images_billed"]
        rec = await store.get("job-00000")
    assert not scope.cancelled_caught, f"the run never ended; {billed} images billed for one job"
    assert billed <= opts.max_attempts
    assert rec["state"] == "failed"
    assert result.reason is StopReason.FINISHED
    check_invariants(layout.root)


async def test_storage_that_always_answers_403_does_not_loop_on_paid_generations(tmp_path):
    """Every download refused with 403 (a proxy blocking the storage host, say): each refusal
    means "generate again", but the run must end with the job failed, not pay forever."""
    layout, store = await one_job(tmp_path)
    async with store, running_emulator(emu()) as e:
        relay = ImageRelay(e.root_url)
        relay.mode = "403"
        async with serving(relay.app()) as root:
            opts = dataclasses.replace(FAST, max_attempts=3)
            with anyio.move_on_after(3) as scope:
                await run_once(store, layout, root + "/api/v1", options=opts)
        billed = e.stats()["images_billed"]
        rec = await store.get("job-00000")
    assert not scope.cancelled_caught, f"the run never ended; {billed} images billed for one job"
    assert billed <= opts.max_attempts
    assert rec["state"] == "failed"
    check_invariants(layout.root)


async def test_a_tampered_url_answered_403_by_storage_is_generated_again(tmp_path):
    """A 403 from storage that is not an expiry (SignatureDoesNotMatch): the URL is dead, the
    image is generated again (and counted), once."""
    layout, store = await one_job(tmp_path)
    async with store, running_emulator(emu()) as e:
        # generated, then the recorded URL's signature broken before the download uses it
        await generate_only(store, e.base_url, 1)
        con = sqlite3.connect(layout.db)
        con.execute("UPDATE jobs SET image_url = replace(image_url, 'Signature=', 'Signature=AA')")
        con.commit()
        con.close()
        runner, _ = await run_once(store, layout, e.base_url)
        rec = await store.get("job-00000")
        s = e.stats()
    assert runner.counters.regenerated == 1 and rec["regenerated"] == 1
    assert rec["state"] == "done"
    assert s["images_billed"] == 2 and rec["billed"] == 2
    assert s["download_by_status"].get("403") == 1
    check_invariants(layout.root)


async def test_an_image_storage_forgot_404_is_generated_again(tmp_path):
    layout = RunLayout(tmp_path / "run")
    store = await JobStore.open(layout.db)
    await store.import_specs(make_specs(2), source="test.csv")
    async with store, running_emulator(emu(max_images=1)) as e:
        # both generated, then only the second one's image is still stored
        await generate_only(store, e.base_url, 2)
        runner, _ = await run_once(store, layout, e.base_url)
        stats = await store.stats()
        s = e.stats()
    assert stats.count(State.DONE) == 2
    assert runner.counters.regenerated == 1 and stats.regenerated == 1
    assert s["download_by_status"].get("404") == 1
    assert s["images_billed"] == 3
    check_invariants(layout.root)
