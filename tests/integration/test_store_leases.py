"""JobStore leases, fencing and outcomes on a real SQLite file.

A write is fenced by its claim token: once the token no longer owns the job (the lease was
reclaimed, taken over, or the job moved on), the write raises LeaseLost and changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from jobs.errors import JobStoreError, LeaseLost
from jobs.states import State
from jobs.store import Claim, JobStore
from tests.conftest import store_target

from .store_support import (
    FakeClock,
    generated,
    row,
    specs,
    states,
    stored,
    table,
)

pytestmark = pytest.mark.anyio

SOURCE = "catalog.jsonl"
LEASE = 60.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path, backend: str) -> Path:
    """The store's SQLite file, or (backend ``postgres``) the URL of an empty database."""
    return store_target(backend, tmp_path / "batcher.db")  # type: ignore[return-value]


@pytest.fixture
async def store(db: Path, clock: FakeClock) -> AsyncIterator[JobStore]:
    s = await JobStore.open(db, clock=clock)
    try:
        await s.import_specs(specs(["a", "b", "c", "d"]), source=SOURCE)
        yield s
    finally:
        await s.close()


async def claim_one(store: JobStore, job_id: str | None = None, **kw: Any) -> Claim:
    claims = await store.claim(limit=1, lease_seconds=kw.pop("lease_seconds", LEASE), **kw)
    assert len(claims) == 1, claims
    if job_id is not None:
        assert claims[0].id == job_id
    return claims[0]


async def hold_all_but_a(store: JobStore) -> None:
    """Lease b, c and d for good, so that every later claim in the test is a claim of a."""
    claims = await store.claim(limit=4, lease_seconds=1e9)
    assert [c.id for c in claims] == ["a", "b", "c", "d"]
    await store.release("a", claims[0].token)


async def to_generated(store: JobStore, job_id: str, **gen: Any) -> Claim:
    claim = await claim_one(store, job_id)
    await store.record_generated(job_id, claim.token, generated(**gen), lease_seconds=LEASE)
    return claim


# ----------------------------------------------------------------------------- claims


async def test_claim_moves_pending_to_running_under_a_token(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    claims = await store.claim(limit=2, lease_seconds=30, worker="host:1")
    assert [c.id for c in claims] == ["a", "b"]
    assert len({c.token for c in claims}) == 1  # one token per batch
    token = claims[0].token
    assert len(token) >= 16
    for c in claims:
        assert c.state is State.RUNNING
        assert (c.model, c.size, c.seed, c.prompt_extend) == (
            "z-image-turbo",
            "1024*1024",
            42,
            False,
        )
        assert c.output == f"{c.id}.png"
        assert (c.attempts, c.download_attempts, c.image_url, c.request_id) == (0, 0, None, None)
        r = row(db, c.id)
        assert r["state"] == "running"
        assert r["claim_token"] == token
        assert r["worker"] == "host:1"
        assert r["lease_expires_at"] == clock.now + 30
        assert r["started_at"] == clock.now
        assert r["attempts"] == 0  # an attempt is charged by its outcome, not by the claim
    assert states(db) == {"a": "running", "b": "running", "c": "pending", "d": "pending"}
    other = await store.claim(limit=10, lease_seconds=30)
    assert [c.id for c in other] == ["c", "d"]
    assert other[0].token != token
    assert await store.claim(limit=10, lease_seconds=30) == []


async def test_claim_with_no_room_claims_nothing(db: Path, store: JobStore) -> None:
    assert await store.claim(limit=0, lease_seconds=LEASE) == []
    assert set(states(db).values()) == {"pending"}


async def test_started_at_is_the_first_start(db: Path, store: JobStore, clock: FakeClock) -> None:
    first = clock.now
    claim = await claim_one(store, "a")
    await store.release("a", claim.token)
    clock.advance(50)
    await claim_one(store, "a")
    assert row(db, "a")["started_at"] == first


async def test_generated_jobs_are_claimed_first_and_stay_generated(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    await to_generated(store, "a")
    clock.advance(LEASE + 1)  # the worker died during the download
    claims = await store.claim(limit=2, lease_seconds=LEASE)
    assert [(c.id, c.state) for c in claims] == [("a", State.GENERATED), ("b", State.RUNNING)]
    download = claims[0]
    assert download.image_url == generated().image_url
    assert download.request_id == "req-1"
    assert (download.width, download.height) == (1024, 1024)
    assert download.attempts == 1  # not charged again by the claim
    r = row(db, "a")
    assert r["state"] == "generated"
    assert r["claim_token"] == download.token
    assert r["lease_expires_at"] == clock.now + LEASE
    assert r["billed"] == 1


async def test_a_leased_generated_job_is_not_claimed_twice(
    store: JobStore, clock: FakeClock
) -> None:
    await to_generated(store, "a")
    clock.advance(LEASE - 1)
    assert [c.id for c in await store.claim(limit=4, lease_seconds=LEASE)] == ["b", "c", "d"]
    clock.advance(1)  # exactly at the end of the lease: still held
    assert await store.claim(limit=4, lease_seconds=LEASE) == []
    clock.advance(0.001)  # past it
    assert [c.id for c in await store.claim(limit=4, lease_seconds=LEASE)] == ["a"]


async def test_a_job_waiting_for_its_retry_time_is_not_claimed(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    claims = await store.claim(limit=4, lease_seconds=LEASE)
    token = claims[0].token
    await store.retry_later("a", token, delay=30, code="Throttling", message="429")
    assert row(db, "a")["next_attempt_at"] == clock.now + 30
    for job_id in "bcd":
        await store.release(job_id, token)
    clock.advance(29.5)
    assert [c.id for c in await store.claim(limit=4, lease_seconds=LEASE)] == ["b", "c", "d"]
    assert await store.next_due_at() == clock.now + 0.5
    assert await store.claim(limit=4, lease_seconds=LEASE) == []
    clock.advance(0.5)  # due exactly now
    assert [c.id for c in await store.claim(limit=4, lease_seconds=LEASE)] == ["a"]


async def test_a_download_waiting_for_its_retry_time_is_not_claimed(
    store: JobStore, clock: FakeClock
) -> None:
    claim = await to_generated(store, "a")
    await store.retry_download_later("a", claim.token, delay=20, code="Timeout", message="slow")
    clock.advance(19)
    assert "a" not in [c.id for c in await store.claim(limit=4, lease_seconds=LEASE)]
    clock.advance(1)
    [again] = await store.claim(limit=4, lease_seconds=LEASE)
    assert (again.id, again.state, again.download_attempts) == ("a", State.GENERATED, 1)


async def test_retried_jobs_queue_behind_due_ones_by_due_time(
    store: JobStore, clock: FakeClock
) -> None:
    claims = await store.claim(limit=2, lease_seconds=LEASE)
    await store.retry_later("a", claims[0].token, delay=5, code="E", message="m")
    await store.retry_later("b", claims[0].token, delay=3, code="E", message="m")
    clock.advance(10)
    assert [c.id for c in await store.claim(limit=4, lease_seconds=LEASE)] == ["c", "d", "b", "a"]


async def test_next_due_at(store: JobStore, clock: FakeClock) -> None:
    assert await store.next_due_at() == 0  # imported jobs are due at once
    claims = await store.claim(limit=4, lease_seconds=LEASE)
    if store.shared:  # a running job waits for its lease: another worker may have died
        assert await store.next_due_at() == clock.now + LEASE
    else:
        assert await store.next_due_at() is None  # nothing waits: everything is running
    await store.retry_later("c", claims[0].token, delay=7, code="E", message="m")
    assert await store.next_due_at() == clock.now + 7


async def test_a_shared_table_takes_over_a_running_job_only_once_its_lease_expired(
    store: JobStore, clock: FakeClock
) -> None:
    if not store.shared:
        pytest.skip("SQLite reclaims a dead run's jobs at the start of the next run")
    first = await store.claim(limit=4, lease_seconds=LEASE)
    assert await store.claim(limit=4, lease_seconds=LEASE) == []  # all held, none expired
    clock.advance(LEASE + 1)
    again = await store.claim(limit=4, lease_seconds=LEASE)
    assert [c.id for c in again] == [c.id for c in first]
    assert all(c.state is State.RUNNING and c.attempts == 0 for c in again)
    with pytest.raises(LeaseLost):  # the old holder's late write is refused
        await store.record_generated("a", first[0].token, generated(), lease_seconds=LEASE)
    await store.record_generated("a", again[0].token, generated(), lease_seconds=LEASE)


async def test_a_shared_table_takes_over_expired_jobs_in_the_order_their_leases_ran_out(
    store: JobStore, clock: FakeClock
) -> None:
    if not store.shared:
        pytest.skip("SQLite reclaims a dead run's jobs at the start of the next run")
    [a] = await store.claim(limit=1, lease_seconds=20)  # runs out last
    clock.advance(1)
    [b] = await store.claim(limit=1, lease_seconds=5)  # runs out first
    clock.advance(60)
    again = await store.claim(limit=2, lease_seconds=LEASE)
    # ordered by the old leases, not by the new one they now share
    assert [c.id for c in again] == [b.id, a.id]


# ------------------------------------------------------------------ heartbeat, reclaim


async def test_heartbeat_extends_only_held_jobs_and_reports_lost_ones(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    mine = await store.claim(limit=2, lease_seconds=LEASE)  # a, b
    theirs = await claim_one(store, "c")
    token = mine[0].token
    await store.record_generated("b", token, generated(), lease_seconds=LEASE)  # still held
    lease_c = row(db, "c")["lease_expires_at"]
    clock.advance(40)
    lost = await store.heartbeat(token, ["a", "b", "c", "nope"], lease_seconds=LEASE)
    assert lost == {"c", "nope"}
    assert row(db, "a")["lease_expires_at"] == clock.now + LEASE
    assert row(db, "b")["lease_expires_at"] == clock.now + LEASE
    assert row(db, "c")["lease_expires_at"] == lease_c  # not someone else's
    assert row(db, "c")["claim_token"] == theirs.token
    await store.complete("b", token, stored())
    assert await store.heartbeat(token, ["a", "b"], lease_seconds=LEASE) == {"b"}
    assert await store.heartbeat(token, [], lease_seconds=LEASE) == set()


async def test_a_heartbeat_keeps_a_job_from_being_reclaimed(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    claim = await claim_one(store, "a")
    for _ in range(5):
        clock.advance(LEASE - 1)
        assert await store.heartbeat(claim.token, ["a"], lease_seconds=LEASE) == set()
        assert await store.reclaim() == 0
    assert row(db, "a")["claim_token"] == claim.token


async def test_reclaim_takes_back_expired_leases_without_charging(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    old = await claim_one(store, "a", lease_seconds=10)
    await claim_one(store, "b", lease_seconds=100)
    gen = await to_generated(store, "c")  # generated, under a lease of LEASE
    clock.advance(10)
    assert await store.reclaim() == 0  # exactly at expiry: still held
    clock.advance(0.001)
    assert await store.reclaim() == 1
    a = row(db, "a")
    assert (a["state"], a["claim_token"], a["lease_expires_at"]) == ("pending", None, None)
    assert a["attempts"] == 0
    assert row(db, "b")["state"] == "running"
    clock.advance(100)
    assert await store.reclaim() == 1  # b; c's expired download lease is dropped, not counted
    c = row(db, "c")
    assert (c["state"], c["claim_token"], c["lease_expires_at"]) == ("generated", None, None)
    assert c["image_url"] is not None
    with pytest.raises(LeaseLost):
        await store.record_generated("a", old.token, generated(), lease_seconds=LEASE)
    with pytest.raises(LeaseLost):
        await store.complete("c", gen.token, stored())


async def test_reclaim_all_running_takes_every_running_job(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    await store.claim(limit=2, lease_seconds=3600)  # a, b: leases far from expiry
    await to_generated(store, "c")
    assert await store.reclaim() == 0
    assert await store.reclaim(all_running=True) == 2
    assert states(db) == {"a": "pending", "b": "pending", "c": "generated", "d": "pending"}
    assert all(r["claim_token"] is None for r in table(db))
    assert await store.reclaim(all_running=True) == 0


# -------------------------------------------------------------------------- fencing

Write = Callable[[JobStore, str, str], Awaitable[None]]

RUNNING_WRITES: dict[str, Write] = {
    "record_generated": lambda s, j, t: s.record_generated(j, t, generated(), lease_seconds=LEASE),
    "retry_later": lambda s, j, t: s.retry_later(j, t, delay=1, code="E", message="m"),
    "fail": lambda s, j, t: s.fail(j, t, code="E", message="m"),
    "release": lambda s, j, t: s.release(j, t),
}
GENERATED_WRITES: dict[str, Write] = {
    "complete": lambda s, j, t: s.complete(j, t, stored("late")),
    "record_file": lambda s, j, t: s.record_file(j, t, stored("late")),
    "retry_download_later": lambda s, j, t: s.retry_download_later(
        j, t, delay=1, code="E", message="m"
    ),
    "regenerate": lambda s, j, t: s.regenerate(j, t, code="E", message="m"),
    "fail": lambda s, j, t: s.fail(j, t, code="E", message="m"),
    "release": lambda s, j, t: s.release(j, t),
}


@pytest.mark.parametrize("write", list(RUNNING_WRITES), ids=str)
@pytest.mark.parametrize("after", ["reclaimed", "taken_over", "reclaimed_all"])
async def test_a_stale_token_cannot_write_a_running_job(
    db: Path, store: JobStore, clock: FakeClock, write: str, after: str
) -> None:
    stale = await claim_one(store, "a")
    clock.advance(LEASE + 1)
    if after == "reclaimed_all":
        await store.reclaim(all_running=True)
    else:
        assert await store.reclaim() == 1
    if after == "taken_over":
        await claim_one(store, "a")
    before = table(db)
    with pytest.raises(LeaseLost) as info:
        await RUNNING_WRITES[write](store, "a", stale.token)
    assert "'a'" in str(info.value)
    assert isinstance(info.value, JobStoreError)
    assert table(db) == before


@pytest.mark.parametrize("write", list(GENERATED_WRITES), ids=str)
async def test_a_stale_token_cannot_write_a_generated_job(
    db: Path, store: JobStore, clock: FakeClock, write: str
) -> None:
    stale = await to_generated(store, "a")
    clock.advance(LEASE + 1)
    [fresh] = await store.claim(limit=1, lease_seconds=LEASE)  # takes over the download
    assert (fresh.id, fresh.state) == ("a", State.GENERATED)
    before = table(db)
    with pytest.raises(LeaseLost):
        await GENERATED_WRITES[write](store, "a", stale.token)
    assert table(db) == before
    await GENERATED_WRITES[write](store, "a", fresh.token)  # the owner's write goes through


@pytest.mark.parametrize("write", list(RUNNING_WRITES) + list(GENERATED_WRITES), ids=str)
async def test_a_finished_job_takes_no_more_writes(db: Path, store: JobStore, write: str) -> None:
    claim = await to_generated(store, "a")
    await store.complete("a", claim.token, stored())
    before = table(db)
    fn = RUNNING_WRITES.get(write) or GENERATED_WRITES[write]
    with pytest.raises(LeaseLost):
        await fn(store, "a", claim.token)
    with pytest.raises(LeaseLost):
        await fn(store, "no-such-job", claim.token)
    assert table(db) == before


@pytest.mark.parametrize("write", ["complete", "record_file", "retry_download_later", "regenerate"])
async def test_a_download_write_on_a_running_job_is_refused(
    db: Path, store: JobStore, write: str
) -> None:
    """The right token in the wrong state: the SQL enforces the table too."""
    claim = await claim_one(store, "a")
    before = table(db)
    with pytest.raises(LeaseLost):
        await GENERATED_WRITES[write](store, "a", claim.token)
    assert table(db) == before


async def test_retry_later_on_a_generated_job_is_refused(db: Path, store: JobStore) -> None:
    claim = await to_generated(store, "a")
    before = table(db)
    with pytest.raises(LeaseLost):
        await store.retry_later("a", claim.token, delay=1, code="E", message="m")
    with pytest.raises(LeaseLost):
        await store.record_generated("a", claim.token, generated(), lease_seconds=LEASE)
    assert table(db) == before


async def test_a_stalled_worker_cannot_overwrite_the_new_owners_result(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    """A claims, stalls past its lease; B takes over and finishes; A wakes."""
    a = await claim_one(store, "a", worker="A")
    clock.advance(LEASE + 5)
    assert await store.reclaim() == 1
    b = await claim_one(store, "a", worker="B")
    await store.record_generated(
        "a", b.token, generated(request_id="req-B", cost="0.04"), lease_seconds=LEASE
    )
    await store.complete("a", b.token, stored("B"))
    result = row(db, "a")
    # A's late answers, in every form, are rejected
    assert await store.heartbeat(a.token, ["a"], lease_seconds=LEASE) == {"a"}
    for late in (
        lambda: store.record_generated(
            "a", a.token, generated(request_id="req-A"), lease_seconds=1
        ),
        lambda: store.record_file("a", a.token, stored("A")),
        lambda: store.complete("a", a.token, stored("A")),
        lambda: store.retry_later("a", a.token, delay=1, code="E", message="A"),
        lambda: store.fail("a", a.token, code="E", message="A"),
        lambda: store.release("a", a.token),
        lambda: store.regenerate("a", a.token, code="E", message="A"),
        lambda: store.retry_download_later("a", a.token, delay=1, code="E", message="A"),
    ):
        with pytest.raises(LeaseLost):
            await late()
    assert row(db, "a") == result
    assert (result["state"], result["sha256"], result["request_id"]) == ("done", "B" * 64, "req-B")
    assert result["worker"] == "B"
    assert result["billed"] == 1
    assert (await store.stats()).images_billed == 1


async def test_the_old_owner_of_a_taken_over_download_is_fenced(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    a = await to_generated(store, "a")
    clock.advance(LEASE + 1)
    b = await claim_one(store, "a")  # no reclaim needed for a generated job
    await store.complete("a", b.token, stored("B"))
    with pytest.raises(LeaseLost):
        await store.complete("a", a.token, stored("A"))
    assert row(db, "a")["sha256"] == "B" * 64


# ------------------------------------------------------------------------- outcomes


async def test_record_generated_writes_the_answer_and_charges_one_attempt(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    claim = await claim_one(store, "a")
    clock.advance(3)
    await store.record_generated("a", claim.token, generated(cost="0.04"), lease_seconds=90)
    r = row(db, "a")
    assert r["state"] == "generated"
    assert r["claim_token"] == claim.token  # the download goes on under the same lease
    assert r["lease_expires_at"] == clock.now + 90
    assert (r["attempts"], r["billed"], r["cost_micros"], r["currency"]) == (1, 1, 40_000, "CNY")
    assert (r["request_id"], r["width"], r["height"], r["image_count"]) == ("req-1", 1024, 1024, 1)
    assert r["image_url"] == generated().image_url
    assert r["url_expires_at"] == generated().url_expires_at
    assert r["actual_prompt"] == "a rewritten prompt"
    assert (r["latency_ms"], r["generated_at"]) == (1234.5, clock.now)
    assert (r["error_code"], r["error_message"], r["download_attempts"]) == (None, None, 0)


async def test_complete_stores_the_file_and_frees_the_lease(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    claim = await to_generated(store, "a")
    clock.advance(2)
    await store.complete("a", claim.token, stored("f"))
    r = row(db, "a")
    assert (r["state"], r["sha256"], r["bytes"]) == ("done", "f" * 64, 1001)
    assert (r["claim_token"], r["lease_expires_at"], r["finished_at"]) == (None, None, clock.now)
    assert r["attempts"] == 1


async def test_record_file_notes_the_hash_before_complete(db: Path, store: JobStore) -> None:
    claim = await to_generated(store, "a")
    await store.record_file("a", claim.token, stored("h"))
    r = row(db, "a")
    assert (r["state"], r["sha256"], r["claim_token"]) == ("generated", "h" * 64, claim.token)
    await store.release("a", claim.token)
    again = await claim_one(store, "a")
    assert (again.sha256, again.bytes) == ("h" * 64, 1001)


@pytest.mark.parametrize(
    ("charge", "throttled", "ambiguous"),
    [(True, False, False), (False, True, False), (False, False, True), (True, True, True)],
)
async def test_retry_later_counters(
    db: Path, store: JobStore, clock: FakeClock, charge: bool, throttled: bool, ambiguous: bool
) -> None:
    await hold_all_but_a(store)
    for round_ in (1, 2):
        claim = await claim_one(store, "a")
        await store.retry_later(
            "a",
            claim.token,
            delay=-5,  # a negative delay is due now, not in the past
            code="Throttling",
            message="slow down",
            request_id=f"req-{round_}",
            charge_attempt=charge,
            throttled=throttled,
            ambiguous=ambiguous,
        )
        r = row(db, "a")
        assert r["state"] == "pending"
        assert r["attempts"] == round_ * charge
        assert r["throttled"] == round_ * throttled
        assert r["ambiguous"] == round_ * ambiguous
        assert r["next_attempt_at"] == clock.now
        assert (r["error_code"], r["error_message"]) == ("Throttling", "slow down")
        assert r["request_id"] == f"req-{round_}"
        assert (r["claim_token"], r["lease_expires_at"], r["billed"]) == (None, None, 0)


async def test_fail_from_running(db: Path, store: JobStore, clock: FakeClock) -> None:
    claims = await store.claim(limit=2, lease_seconds=LEASE)
    token = claims[0].token
    await store.fail("a", token, code="InvalidParameter", message="bad", request_id="req-9")
    await store.fail("b", token, code="Arrearage", message="no money", charge_attempt=False)
    a, b = row(db, "a"), row(db, "b")
    assert (a["state"], a["attempts"], a["request_id"], a["finished_at"]) == (
        "failed",
        1,
        "req-9",
        clock.now,
    )
    assert (a["error_code"], a["error_message"]) == ("InvalidParameter", "bad")
    assert (b["state"], b["attempts"], b["request_id"]) == ("failed", 0, None)
    assert a["claim_token"] is None and b["lease_expires_at"] is None


async def test_fail_from_generated_keeps_the_request_id(db: Path, store: JobStore) -> None:
    claim = await to_generated(store, "a")
    await store.fail("a", claim.token, code="DownloadFailed", message="403", charge_attempt=False)
    r = row(db, "a")
    assert (r["state"], r["request_id"], r["attempts"], r["billed"]) == ("failed", "req-1", 1, 1)
    assert r["image_url"] is not None


async def test_release_charges_nothing(db: Path, store: JobStore, clock: FakeClock) -> None:
    claims = await store.claim(limit=2, lease_seconds=LEASE)
    token = claims[0].token
    await store.record_generated("b", token, generated(), lease_seconds=LEASE)
    await store.release("a", token)
    await store.release("b", token)
    a, b = row(db, "a"), row(db, "b")
    assert (a["state"], a["attempts"], a["next_attempt_at"], a["claim_token"]) == (
        "pending",
        0,
        0,
        None,
    )
    assert (b["state"], b["attempts"], b["claim_token"], b["lease_expires_at"]) == (
        "generated",
        1,
        None,
        None,
    )
    # both are claimable again at once, the download first
    assert [c.id for c in await store.claim(limit=2, lease_seconds=LEASE)] == ["b", "a"]


async def test_retry_download_later(db: Path, store: JobStore, clock: FakeClock) -> None:
    for n in (1, 2):
        claim = await claim_one(store, "a") if n == 2 else await to_generated(store, "a")
        await store.retry_download_later(
            "a", claim.token, delay=15, code="ReadTimeout", message="slow"
        )
        r = row(db, "a")
        assert (r["state"], r["download_attempts"], r["attempts"], r["billed"]) == (
            "generated",
            n,
            1,
            1,
        )
        assert r["next_attempt_at"] == clock.now + 15
        assert (r["error_code"], r["claim_token"], r["lease_expires_at"]) == (
            "ReadTimeout",
            None,
            None,
        )
        clock.advance(15)


async def test_regenerate_resets_the_answer_and_keeps_the_bill(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    await hold_all_but_a(store)
    first = await to_generated(store, "a", cost="0.04", request_id="req-1")
    await store.retry_download_later("a", first.token, delay=0, code="E", message="m")
    second = await claim_one(store, "a")
    await store.record_file("a", second.token, stored("partial"))
    clock.advance(5)
    await store.regenerate("a", second.token, code="URLExpired", message="the URL expired")
    r = row(db, "a")
    assert r["state"] == "pending"
    for column in (
        "request_id",
        "image_url",
        "url_expires_at",
        "width",
        "height",
        "image_count",
        "actual_prompt",
        "latency_ms",
        "sha256",
        "bytes",
        "generated_at",
        "finished_at",
        "claim_token",
        "lease_expires_at",
    ):
        assert r[column] is None, column
    assert (r["regenerated"], r["download_attempts"], r["attempts"]) == (1, 0, 1)
    assert (r["billed"], r["cost_micros"]) == (1, 40_000)
    assert r["next_attempt_at"] == clock.now
    assert (r["error_code"], r["error_message"]) == ("URLExpired", "the URL expired")
    # the second generation adds to the bill
    third = await claim_one(store, "a")
    assert third.state is State.RUNNING
    assert third.image_url is None
    await store.record_generated(
        "a", third.token, generated(cost="0.05", request_id="req-2"), lease_seconds=LEASE
    )
    await store.complete("a", third.token, stored("final"))
    r = row(db, "a")
    assert (r["billed"], r["cost_micros"], r["attempts"], r["regenerated"]) == (2, 90_000, 2, 1)
    assert (r["state"], r["request_id"]) == ("done", "req-2")
    stats = await store.stats()
    assert (stats.images_billed, stats.cost, stats.regenerated) == (2, Decimal("0.09"), 1)


async def test_retry_failed_all_and_by_code(db: Path, store: JobStore, clock: FakeClock) -> None:
    claims = await store.claim(limit=3, lease_seconds=LEASE)
    token = claims[0].token
    await store.fail("a", token, code="InvalidParameter", message="m")
    await store.fail("b", token, code="DataInspectionFailed", message="m")
    await store.retry_later("c", token, delay=1, code="E", message="m")
    [d] = await store.claim(limit=1, lease_seconds=LEASE)
    assert d.id == "d"  # c waits for its retry time
    clock.advance(2)
    c = await claim_one(store, "c")
    await store.fail("c", c.token, code="InvalidParameter", message="m")
    assert await store.retry_failed(code="NoSuchCode") == 0
    assert await store.retry_failed(code="InvalidParameter") == 2
    assert states(db) == {"a": "pending", "b": "failed", "c": "pending", "d": "running"}
    r = row(db, "c")
    assert (r["attempts"], r["download_attempts"], r["next_attempt_at"], r["finished_at"]) == (
        0,
        0,
        0,
        None,
    )
    assert await store.retry_failed() == 1
    assert states(db) == {"a": "pending", "b": "pending", "c": "pending", "d": "running"}
    assert await store.retry_failed() == 0
    assert (await store.stats()).errors_by_code == {}


async def test_retry_failed_download_with_a_live_url_goes_back_to_generated(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    live = await to_generated(store, "a", expires_at=clock.now + 3600)
    await store.fail("a", live.token, code="DownloadFailed", message="m", charge_attempt=False)
    dead = await to_generated(store, "b", expires_at=clock.now + 10)
    await store.fail("b", dead.token, code="DownloadFailed", message="m", charge_attempt=False)
    unknown = await to_generated(store, "c", expires_at=None)
    await store.fail("c", unknown.token, code="DownloadFailed", message="m", charge_attempt=False)
    clock.advance(10)
    assert await store.retry_failed(code="DownloadFailed") == 3
    assert states(db)["a"] == "generated"  # the image is paid for and still fetchable
    assert states(db)["b"] == "pending"  # its URL has expired: generate again
    assert states(db)["c"] == "pending"  # expiry unknown: do not trust it
    [claim] = [c for c in await store.claim(limit=4, lease_seconds=LEASE) if c.id == "a"]
    assert (claim.state, claim.image_url, claim.download_attempts) == (
        State.GENERATED,
        generated().image_url,
        0,
    )
    await store.complete("a", claim.token, stored())
    assert row(db, "a")["billed"] == 1
