"""The store's side of asynchronous tasks: ``submitted`` keeps its task id through releases,
reclaims and the next run's claim; a create whose answer was never recorded is ambiguous. On
SQLite and PostgreSQL alike (the claim is each backend's own SQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobs.errors import LeaseLost
from jobs.states import State
from jobs.store import JobStore
from tests.conftest import store_target

from .store_support import FakeClock, generated, row, specs, states

pytestmark = pytest.mark.anyio

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
        await s.import_specs(specs(["a", "b"]), source="m.jsonl")
        yield s
    finally:
        await s.close()


async def test_a_submitted_job_keeps_its_task_through_release_reclaim_and_claim(
    store: JobStore, db: Path, clock: FakeClock
) -> None:
    [a, _] = await store.claim(limit=2, lease_seconds=LEASE)
    await store.mark_creating(a.id, a.token)
    assert row(db, "a")["task_id"] == ""
    await store.record_submitted(
        a.id, a.token, task_id="t-1", request_id="r-1", lease_seconds=LEASE
    )
    assert (row(db, "a")["state"], row(db, "a")["task_id"]) == ("submitted", "t-1")
    await store.release(a.id, a.token)  # Ctrl-C: the task goes on at the service
    assert (row(db, "a")["state"], row(db, "a")["task_id"]) == ("submitted", "t-1")
    assert await store.reclaim(all_running=True) == 1  # only b, which was running
    assert states(db) == {"a": "submitted", "b": "pending"}
    [again] = [c for c in await store.claim(limit=5, lease_seconds=LEASE) if c.id == "a"]
    assert (again.state, again.task_id) == (State.SUBMITTED, "t-1")
    assert again.task_submitted_at == clock()
    assert await store.submitted_tasks() == [("a", "t-1", "z-image-turbo")]
    await store.record_generated(a.id, again.token, generated(), lease_seconds=LEASE)
    assert row(db, "a")["state"] == "generated"
    assert row(db, "a")["task_id"] == "t-1"  # kept in the record
    assert row(db, "a")["ambiguous"] == 0


async def test_a_create_whose_answer_was_not_recorded_is_ambiguous(
    store: JobStore, db: Path
) -> None:
    claims = await store.claim(limit=2, lease_seconds=LEASE)
    await store.mark_creating(claims[0].id, claims[0].token)  # sent; then kill -9
    await store.reclaim(all_running=True)
    a, b = row(db, "a"), row(db, "b")
    assert (a["state"], a["task_id"], a["ambiguous"]) == ("pending", None, 1)
    assert (b["state"], b["task_id"], b["ambiguous"]) == ("pending", None, 0)


async def test_an_unknown_task_is_created_again_and_counted_regenerated(
    store: JobStore, db: Path
) -> None:
    [a, _] = await store.claim(limit=2, lease_seconds=LEASE)
    await store.record_submitted(a.id, a.token, task_id="t-9", request_id=None, lease_seconds=LEASE)
    await store.regenerate(a.id, a.token, code="TaskUnknown", message="the service forgot it")
    found = row(db, "a")
    assert (found["state"], found["task_id"], found["regenerated"]) == ("pending", None, 1)
    with pytest.raises(LeaseLost):
        await store.poll_later(a.id, a.token, delay=5, code="x", message="y")


async def test_polls_later_and_cancel(store: JobStore, db: Path, clock: FakeClock) -> None:
    [a, b] = await store.claim(limit=2, lease_seconds=LEASE)
    for claim, task in ((a, "t-a"), (b, "t-b")):
        await store.record_submitted(
            claim.id, claim.token, task_id=task, request_id=None, lease_seconds=LEASE
        )
    await store.poll_later(a.id, a.token, delay=30, code="transport.reset", message="reset")
    found = row(db, "a")
    assert (found["state"], found["claim_token"], found["task_id"]) == ("submitted", None, "t-a")
    assert found["next_attempt_at"] == clock() + 30
    assert await store.cancel_submitted("b", code="TaskCanceled", message="cancelled") is True
    assert (row(db, "b")["state"], row(db, "b")["error_code"]) == ("failed", "TaskCanceled")
    assert await store.cancel_submitted("b", code="TaskCanceled", message="again") is False
    assert await store.pending_by_kind() == {("z-image-turbo", False): 1}  # a, not yet billed


async def test_a_dead_workers_create_is_ambiguous_when_its_job_is_taken_over(
    store: JobStore, db: Path, clock: FakeClock
) -> None:
    """A live worker taking over a running job whose lease expired (a shared table's claim, or
    a reclaim then a claim) counts the create it had in flight as ambiguous, and creates anew."""
    claims = await store.claim(limit=2, lease_seconds=LEASE)
    await store.mark_creating(claims[0].id, claims[0].token)  # sent; then the worker died
    clock.advance(LEASE + 1)
    if not store.shared:
        await store.reclaim()
    taken = {c.id: c for c in await store.claim(limit=5, lease_seconds=LEASE)}
    assert set(taken) == {"a", "b"}
    assert (taken["a"].state, taken["a"].task_id) == (State.RUNNING, None)
    assert (row(db, "a")["ambiguous"], row(db, "b")["ambiguous"]) == (1, 0)
    with pytest.raises(LeaseLost):
        await store.mark_creating("a", claims[0].token)  # the dead worker's token is refused
