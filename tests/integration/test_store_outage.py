"""A PostgreSQL job table whose connection is cut (a real TCP forwarder between the store and
the server, ``tests/tcpproxy.py``): the error is StoreUnreachable, the engine reconnects once
the network is back, a store with an ``outage`` hook waits and writes once, and a write whose
lease another store took over meanwhile is refused by its claim token."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio
import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError

from jobs.errors import LeaseLost, StoreUnavailable, StoreUnreachable
from jobs.states import State
from jobs.store import Claim, JobStore
from tests.pgsupport import fresh, query
from tests.tcpproxy import TcpProxy

from .store_support import T0, FakeClock, generated, numbered

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]


@pytest.fixture
def db() -> str:
    return fresh()


@pytest.fixture
def proxy(db: str) -> Iterator[TcpProxy]:
    with TcpProxy.to(db) as p:
        yield p


async def test_a_cut_connection_is_store_unreachable_and_the_engine_reconnects(
    db: str, proxy: TcpProxy
) -> None:
    clock = FakeClock()
    async with await JobStore.open(proxy.url(db), clock=clock) as store:
        await store.import_specs(numbered(4), source="m.csv")
        held = await store.claim(limit=2, lease_seconds=60)
        proxy.cut()
        with pytest.raises(StoreUnreachable) as info:
            await store.heartbeat(held[0].token, [c.id for c in held], lease_seconds=60)
        message = str(info.value)
        assert "\n" not in message and f"127.0.0.1:{proxy.port}" in message, message
        with pytest.raises(StoreUnreachable):  # a new connection is refused as well
            await store.claim(limit=1, lease_seconds=60)
        proxy.restore()
        # the pool's dead connections are replaced: the next calls just work
        assert await store.heartbeat(held[0].token, [c.id for c in held], lease_seconds=60) == set()
        assert len(await store.claim(limit=2, lease_seconds=60)) == 2
    assert proxy.refused >= 1


async def test_a_silent_network_times_out_as_store_unreachable(db: str, proxy: TcpProxy) -> None:
    """Packets dropped without a word (the proxy frozen): a statement gives up after the URL's
    command_timeout instead of hanging, and once the network is back the store goes on."""
    async with await JobStore.open(proxy.url(db) + "?command_timeout=1") as store:
        await store.import_specs(numbered(2), source="m.csv")
        held = await store.claim(limit=2, lease_seconds=60)
        proxy.freeze()
        with anyio.fail_after(10):  # shielded group commit: only the statement timeout ends it
            with pytest.raises(StoreUnreachable, match="no answer in time"):
                await store.heartbeat(held[0].token, [c.id for c in held], lease_seconds=60)
        proxy.thaw()
        assert await store.heartbeat(held[0].token, [c.id for c in held], lease_seconds=60) == set()


async def test_a_bad_command_timeout_in_the_url_is_one_line(db: str) -> None:
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(StoreUnavailable, match="command_timeout must be a number"):
            await JobStore.open(f"{db}?command_timeout={bad}")


async def test_a_store_error_that_is_not_the_network_stays_store_unavailable(db: str) -> None:
    async with await JobStore.open(db) as store:
        await store.import_specs(numbered(1), source="m.csv")
        with pytest.raises(StoreUnavailable) as info:
            await store.set_meta("x" * 10, "\x00")  # PostgreSQL refuses NUL in text: 22021
        assert not isinstance(info.value, StoreUnreachable)


async def test_an_outage_hook_waits_and_every_write_lands_once(db: str, proxy: TcpProxy) -> None:
    clock = FakeClock()
    calls: list[str] = []

    async def outage(exc: StoreUnreachable) -> bool:
        calls.append(str(exc))
        if len(calls) == 1:
            await anyio.sleep(0.3)  # the network comes back a while later
            proxy.restore()
        await anyio.sleep(0.1)
        return True

    async with await JobStore.open(proxy.url(db), clock=clock) as store:
        await store.import_specs(numbered(3), source="m.csv")
        held = await store.claim(limit=3, lease_seconds=60)
        store.outage = outage
        proxy.cut()

        async def record(c: Claim) -> None:
            await store.record_generated(
                c.id, c.token, generated(request_id=f"r-{c.id}"), lease_seconds=60
            )

        async def renew() -> None:
            assert await store.heartbeat(held[0].token, [held[0].id], lease_seconds=60) == set()

        async def claim_more() -> None:
            assert await store.claim(limit=1, lease_seconds=60) == []  # all three are held

        async with anyio.create_task_group() as tg:  # writes, a heartbeat and a claim at once
            for claim in held:
                tg.start_soon(record, claim)
            tg.start_soon(renew)
            tg.start_soon(claim_more)
        assert calls, "the hook was never asked"
    rows = query(db, "SELECT id, state, billed, attempts, request_id FROM jobs ORDER BY seq")
    assert [(r["state"], r["billed"], r["attempts"]) for r in rows] == [("generated", 1, 1)] * 3
    assert [r["request_id"] for r in rows] == [f"r-{c.id}" for c in held]


async def test_an_outage_hook_that_gives_up_raises_and_writes_nothing(
    db: str, proxy: TcpProxy
) -> None:
    async def give_up(exc: StoreUnreachable) -> bool:
        return False

    async with await JobStore.open(proxy.url(db), clock=FakeClock()) as store:
        await store.import_specs(numbered(1), source="m.csv")
        [claim] = await store.claim(limit=1, lease_seconds=60)
        store.outage = give_up
        proxy.cut()
        with pytest.raises(StoreUnreachable):
            await store.record_generated(claim.id, claim.token, generated(), lease_seconds=60)
    assert query(db, "SELECT state, billed FROM jobs") == [{"state": "running", "billed": 0}]


async def test_a_late_write_after_another_worker_took_the_job_over_is_refused(
    db: str, proxy: TcpProxy
) -> None:
    """Worker A is cut off past its lease; B takes the job over and records its own image; A's
    answer, written once the network is back, carries the old token and is refused."""
    clock_a, clock_b = FakeClock(), FakeClock()
    async with (
        await JobStore.open(proxy.url(db), clock=clock_a) as a,
        await JobStore.open(db, clock=clock_b) as b,
    ):
        await a.import_specs(numbered(1), source="m.csv")
        [mine] = await a.claim(limit=1, lease_seconds=5, worker="a")
        proxy.cut()
        clock_b.now = T0 + 10  # A's lease ran out
        [taken] = await b.claim(limit=1, lease_seconds=5, worker="b")
        assert taken.id == mine.id and taken.token != mine.token
        await b.record_generated(taken.id, taken.token, generated(request_id="b"), lease_seconds=5)
        proxy.restore()
        with pytest.raises(LeaseLost):
            await a.record_generated(
                mine.id, mine.token, generated(request_id="a"), lease_seconds=5
            )
        assert await a.heartbeat(mine.token, [mine.id], lease_seconds=5) == {mine.id}
        record = await a.get(mine.id)
    assert record is not None
    assert (record["state"], record["request_id"], record["billed"]) == (
        State.GENERATED.value,
        "b",
        1,
    )


async def test_a_worker_cut_off_inside_a_transaction_frees_its_locks_after_its_timeout(
    db: str, proxy: TcpProxy
) -> None:
    """A worker's session goes silent between two statements of a transaction (the proxy
    frozen), holding a job row's lock: the server ends that session after the worker's
    command timeout (its sessions carry idle_in_transaction_session_timeout), so another
    worker takes the lock within seconds instead of waiting for TCP keepalive. The store's
    exclusive transactions (imports) lift the limit."""
    async with await JobStore.open(proxy.url(db) + "?command_timeout=1") as store:
        await store.import_specs(numbered(2), source="m.csv")
        backend = store._backend  # type: ignore[attr-defined]
        async with backend.engine.connect() as conn:
            shown = await conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout")
            assert shown.scalar_one() == "1s"
            await conn.rollback()
            async with conn.begin():
                await backend.exclusive(conn)
                lifted = await conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout")
                assert lifted.scalar_one() == "0"
        conn = await backend.engine.connect()
        await conn.exec_driver_sql("SELECT id FROM jobs WHERE id = 'job000000' FOR UPDATE")
        proxy.freeze()
        t0 = anyio.current_time()
        # straight to the server: waits for the row until the stale session is ended
        other = await asyncpg.connect(db, timeout=5)
        try:
            async with other.transaction():
                await other.execute("SET LOCAL lock_timeout = '20s'")
                got = await other.fetchval("SELECT id FROM jobs WHERE id = 'job000000' FOR UPDATE")
        finally:
            await other.close()
        waited = anyio.current_time() - t0
        assert got == "job000000"
        assert waited < 10.0, waited  # about 1 s: the worker's timeout, not hours
        proxy.thaw()
        with pytest.raises(DBAPIError):  # the server ended that session
            await conn.exec_driver_sql("SELECT 1")
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await conn.close()


async def test_the_stores_exclusive_transactions_wait_for_each_other(db: str) -> None:
    """The advisory lock of an exclusive transaction (an import, a migration, a redo) is held
    to its end: another store's exclusive transaction starts only after it (the lock taken
    inside the transaction, not on the raw connection before it began)."""
    async with await JobStore.open(db) as first, await JobStore.open(db) as second:
        await first.import_specs(numbered(1), source="m.csv")
        a, b = first._backend, second._backend  # type: ignore[attr-defined]
        order: list[str] = []

        async def later() -> None:
            async with b.engine.begin() as conn:
                await b.exclusive(conn)
                order.append("second")

        async with a.engine.begin() as conn:
            await a.exclusive(conn)
            order.append("first")
            async with anyio.create_task_group() as tg:
                tg.start_soon(later)
                await anyio.sleep(0.5)  # the second is waiting for the lock meanwhile
                assert order == ["first"]
                locks = await conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                assert locks.scalar_one() == 1  # the second store's wait
                await conn.commit()
        assert order == ["first", "second"]
