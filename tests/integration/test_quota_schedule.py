"""The shared send schedule in a real PostgreSQL: concurrent reservers from several stores (each
with its own connections, as workers on several hosts), the log of sends, a cut made once
for every worker, and an idle schedule starting over."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import pytest

from batcher.pacing import FLOOR_STEP
from batcher.sharedpacing import (
    ASKING,
    LATE_SHARED,
    LATE_USE,
    RETRY,
    SHARED_MARGIN,
    SharedPacer,
    on_throttled,
)
from jobs.quota import STALE, QuotaSchedule
from jobs.store import JobStore

from ..pgsupport import fresh, query
from ..tcpproxy import TcpProxy

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]

MODEL = "z-image-turbo"


async def schedules(url: str, n: int) -> tuple[list[JobStore], list[QuotaSchedule]]:
    stores = [await JobStore.open(url) for _ in range(n)]
    found = [s.quota_schedule(lane="default", model=MODEL) for s in stores]
    assert all(f is not None for f in found)
    return stores, [f for f in found if f is not None]


async def test_concurrent_reservers_never_get_two_slots_closer_than_the_interval() -> None:
    url = fresh()
    stores, workers = await schedules(url, 4)
    try:
        for w in workers:
            await w.join(interval_s=0.01, least_s=0.01, slow_start=False, probe_every=5.0)
        slots: list[float] = []

        async def reserver(w: QuotaSchedule, least: float) -> None:
            for _ in range(25):
                got = await w.reserve(min_interval=least, lead=0.003, probe_up=1.02)
                assert got.slot >= got.server_now  # never in the past
                slots.append(got.slot)

        async with anyio.create_task_group() as tg:
            # one worker asks for a wider spacing after its own slots
            for w, least in zip(workers, (0.01, 0.01, 0.01, 0.02), strict=True):
                tg.start_soon(reserver, w, least)
    finally:
        for s in stores:
            await s.close()
    slots.sort()
    assert len(slots) == len(set(slots)) == 100
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) >= 0.01 - 1e-6  # float8 epoch seconds: ~1e-7 s of rounding
    logged = query(url, "SELECT at FROM quota_sends ORDER BY at")
    assert [r["at"] for r in logged] == slots  # every slot logged once, for the window counts


async def test_a_throttled_send_cuts_the_shared_rate_once_for_every_worker() -> None:
    url = fresh()
    stores, (a, b) = await schedules(url, 2)
    try:
        await a.join(interval_s=0.02, least_s=0.01, slow_start=False, probe_every=5.0)  # 50/s
        _, joined = await b.join(interval_s=1.0, least_s=0.01, slow_start=True, probe_every=5.0)
        assert joined.interval_s == 0.02 and not joined.slow_start  # the first worker's row
        got = [await w.reserve(min_interval=0.02, lead=0.0, probe_up=1.02) for w in (a, b) * 15]
        slots = [g.slot for g in got]
        await anyio.sleep(max(0.0, slots[-1] - got[-1].server_now) + 0.05)  # all sent by now
        # the last send was throttled: the 29 accepted before it estimate the quota
        late = slots[-1]
        cut = partial(on_throttled, slot=late, quota=True, min_rate=0.05)
        after = await a.adapt(cut, throttled_at=late)
        assert after.cuts == 1 and after.ceiling == 29
        assert after.rate < 50 * 0.96  # lower, for both: the row is shared
        assert after.next_at >= got[-1].state.next_at
        # b was throttled for a send before that cut: nothing new, no second cut
        earlier = slots[-2]
        again = await b.adapt(
            partial(on_throttled, slot=earlier, quota=True, min_rate=0.05), throttled_at=earlier
        )
        assert again == after
        marked = query(url, "SELECT at FROM quota_sends WHERE throttled = 1 ORDER BY at")
        assert [r["at"] for r in marked] == [earlier, late]
        # b's next reservation keeps to the new spacing
        one = await b.reserve(min_interval=0.02, lead=0.0, probe_up=1.02)
        two = await a.reserve(min_interval=0.02, lead=0.0, probe_up=1.02)
        assert two.slot - one.slot >= after.interval_s - 1e-6
    finally:
        for s in stores:
            await s.close()


async def test_an_idle_schedule_starts_over_and_a_live_one_is_kept() -> None:
    url = fresh()
    stores, (a,) = await schedules(url, 1)
    try:
        await a.join(interval_s=0.5, least_s=0.1, slow_start=True, probe_every=5.0)
        _, kept = await a.join(interval_s=0.1, least_s=0.1, slow_start=False, probe_every=5.0)
        assert kept.interval_s == 0.5 and kept.slow_start
        # a worker told a lower rate slows the live schedule to it
        _, slower = await a.join(interval_s=0.1, least_s=0.25, slow_start=False, probe_every=5.0)
        assert slower.interval_s == 0.5 and slower.least_s == 0.25
        query(url, f"UPDATE quota_schedule SET updated_at = updated_at - {STALE + 1}")
        _, over = await a.join(interval_s=0.1, least_s=0.1, slow_start=False, probe_every=5.0)
        assert over.interval_s == 0.1 and over.least_s == 0.1 and not over.slow_start
    finally:
        for s in stores:
            await s.close()


async def test_an_idle_schedule_starts_over_from_the_rate_it_last_held() -> None:
    """A later run's worker, starting slow (2/s), picks up the 9/s an earlier run held, not
    proven yet (its first 429 falls back to the joiner's 2/s at worst); never above its own
    rate, and never slower than its own start."""
    url = fresh()
    stores, (a,) = await schedules(url, 1)
    try:
        await a.join(interval_s=1 / 9, least_s=1 / 9, slow_start=False, probe_every=5.0)
        stale = f"UPDATE quota_schedule SET updated_at = updated_at - {STALE + 1}"
        query(url, stale)
        _, held = await a.join(interval_s=0.5, least_s=0.1, slow_start=True, probe_every=5.0)
        assert held.interval_s == pytest.approx(1 / 9) and held.slow_start
        assert held.known_good == 0.5  # the joiner's: the rate held is not proven again yet
        # (a row left unproven holds its known_good: see below; this one had proven 9/s)
        query(url, f"UPDATE quota_schedule SET slow_start = 0, interval_s = {1 / 9}")
        query(url, stale)
        _, capped = await a.join(interval_s=0.5, least_s=0.2, slow_start=True, probe_every=5.0)
        assert capped.interval_s == 0.2 and capped.slow_start  # told 5/s: no faster
        # a schedule that ended in slow start held only what it had proven
        query(url, "UPDATE quota_schedule SET slow_start = 1, known_good = 0.25, interval_s = 0.1")
        query(url, stale)
        _, proven = await a.join(interval_s=0.5, least_s=0.1, slow_start=True, probe_every=5.0)
        assert proven.interval_s == 0.25 and proven.slow_start
        # a joiner starting faster than the rate held keeps its own start
        query(url, stale)
        _, own = await a.join(interval_s=0.1, least_s=0.1, slow_start=False, probe_every=5.0)
        assert own.interval_s == 0.1 and not own.slow_start
    finally:
        for s in stores:
            await s.close()


async def test_a_sqlite_run_folder_paces_itself(tmp_path: Path) -> None:
    async with await JobStore.open(tmp_path / "batcher.db") as store:
        assert store.quota_schedule(lane="default", model=MODEL) is None


async def soon(check: Callable[[], bool]) -> None:
    """Wait (up to 5 s) until ``check()`` holds: the pacer writes in its own task."""
    for _ in range(250):
        if check():
            return
        await anyio.sleep(0.02)
    pytest.fail("the shared pacer did not write it in 5 s")


class Slots:
    """A shared pacer's ``on_slot``, as the dispatcher is woken by it: each slot's arrival
    sets an event a test waits on."""

    def __init__(self) -> None:
        self.arrived = anyio.Event()

    def __call__(self) -> None:
        self.arrived.set()

    async def next(self, pacer: SharedPacer) -> float:
        """Ask, as the dispatcher does, until a slot is in hand; seconds until it is due."""
        self.arrived = anyio.Event()
        assert pacer.wait_needed(now=anyio.current_time()) == ASKING  # asking
        with anyio.fail_after(5):
            await self.arrived.wait()
        return pacer.wait_needed(now=anyio.current_time())


async def test_a_shared_pacer_hands_out_slots_gives_late_ones_back_and_reports_429s() -> None:
    url = fresh()
    async with await JobStore.open(url) as store:
        schedule = store.quota_schedule(lane="default", model=MODEL)
        assert schedule is not None
        slots = Slots()
        pacer = SharedPacer(schedule, 10.0, start_rate=None, on_slot=slots)

        async def slot() -> float:
            return await slots.next(pacer)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pacer.serve)
            # a slot on time: taken, sent
            await anyio.sleep(await slot())
            due = pacer.reserve(now=anyio.current_time())
            sent = anyio.current_time()
            pacer.sent(at=sent)
            assert sent - due <= LATE_SHARED
            # a slot reached too late: given back, and no longer in the log of sends
            wait = await slot()
            [late] = [r["at"] for r in query(url, "SELECT max(at) AS at FROM quota_sends")]
            await anyio.sleep(wait + LATE_USE + 0.05)
            assert pacer.wait_needed(now=anyio.current_time()) == ASKING  # and asks again
            assert pacer.given_back == 1
            await soon(lambda: not query(url, "SELECT 1 FROM quota_sends WHERE at = $1", late))
            # the service throttled the call that went out: the shared row hears of it
            pacer.throttled(sent)
            await soon(lambda: bool(query(url, "SELECT 1 FROM quota_sends WHERE throttled = 1")))
            tg.cancel_scope.cancel()
        [row] = query(url, "SELECT held_at, cut_at, cuts FROM quota_schedule")
        # one send in the window, throttled: the quota looks far lower, so the rate is cut
        # (by the largest step one throttle may make), for every worker of the run
        assert row["cuts"] == 1 and row["cut_at"] > 0
        assert pacer.rate == pytest.approx(10 * SHARED_MARGIN * FLOOR_STEP)


async def test_a_slot_reached_a_little_late_is_used_and_moves_the_slots_after_it() -> None:
    """A busy host reaching its slot 60 ms late (past the margin's slack, within LATE_USE)
    sends on it, and every later slot moves by the lateness past the slack: the sliding
    second one quota's worth of sends later does not hold one more."""
    url = fresh()
    async with await JobStore.open(url) as store:
        schedule = store.quota_schedule(lane="default", model=MODEL)
        assert schedule is not None
        slots = Slots()
        pacer = SharedPacer(schedule, 10.0, start_rate=None, on_slot=slots)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pacer.serve)
            wait = await slots.next(pacer)
            due = anyio.current_time() + wait
            for _ in range(2):  # another worker holds the next two slots
                await schedule.reserve(min_interval=0.1, lead=0.003, probe_up=1.02)
            [before] = query(url, "SELECT next_at, interval_s FROM quota_schedule")
            await anyio.sleep(max(0.0, due - anyio.current_time()) + 0.06)
            now = anyio.current_time()
            late = now - due
            assert LATE_SHARED < late <= LATE_USE  # (a machine this busy would be a failure)
            assert pacer.wait_needed(now=now) == 0.0  # still usable
            pacer.reserve(now=now)
            pacer.sent(at=now)
            assert pacer.given_back == 0 and pacer.late == 1
            await soon(
                lambda: (
                    query(url, "SELECT next_at FROM quota_schedule")[0]["next_at"]
                    > before["next_at"] + 0.03
                )
            )
            tg.cancel_scope.cancel()
        [after] = query(url, "SELECT next_at FROM quota_schedule")
        # the slots handed out stay; the next free one moves by the lateness past the slack
        assert after["next_at"] == pytest.approx(before["next_at"] + late - LATE_SHARED, abs=0.01)


async def test_a_slot_asked_for_while_the_database_is_cut_arrives_once_it_is_back() -> None:
    """The dispatcher asks for a slot once, then waits for it: a reservation that failed
    (the connection cut) is made again when the database answers, not forgotten."""
    url = fresh()
    with TcpProxy.to(url) as proxy:
        async with await JobStore.open(proxy.url(url)) as store:
            schedule = store.quota_schedule(lane="default", model=MODEL)
            assert schedule is not None
            slots: list[float] = []
            arrived = anyio.Event()

            def on_slot() -> None:
                slots.append(anyio.current_time())
                arrived.set()

            pacer = SharedPacer(schedule, 10.0, start_rate=None, on_slot=on_slot)

            async def slots_reach(n: int, seconds: float) -> None:
                nonlocal arrived
                with anyio.fail_after(seconds):
                    while len(slots) < n:
                        await arrived.wait()
                        arrived = anyio.Event()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pacer.serve)
                assert pacer.wait_needed(now=anyio.current_time()) == ASKING
                await slots_reach(1, 5)  # joined the schedule; a first slot, taken
                pacer.reserve(now=anyio.current_time())
                proxy.cut()
                assert pacer.wait_needed(now=anyio.current_time()) == ASKING
                await anyio.sleep(RETRY + 0.5)  # the reservation failed at least once
                assert len(slots) == 1
                assert pacer.wait_needed(now=anyio.current_time()) == ASKING  # asks no more
                proxy.restore()
                await slots_reach(2, RETRY * 5)
                assert pacer.wait_needed(now=anyio.current_time()) < 1.0
                tg.cancel_scope.cancel()
