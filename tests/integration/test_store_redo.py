"""Redo, retry and review marks in the store: one mechanism for putting jobs back (the old
record kept in ``job_history`` with its reason), moves only along the state table, all or
nothing, and marks written without touching the run's columns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobs.errors import IllegalTransition, UnknownJob
from jobs.states import State
from jobs.store import JobStore, Redo

from .store_support import FakeClock, generated, raw, row, spec, specs, states, stored

pytestmark = pytest.mark.anyio
SOURCE = "m.yaml"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "run" / "batcher.db"


@pytest.fixture
async def store(db: Path, clock: FakeClock) -> AsyncIterator[JobStore]:
    async with await JobStore.open(db, clock=clock) as s:
        await s.import_specs(specs(["a", "b", "c", "d"]), source=SOURCE)
        yield s


async def finish(store: JobStore, job_id: str, tag: str = "x") -> None:
    """Drive one pending job to done through the real transitions."""
    claims = await store.claim(limit=10, lease_seconds=60)
    [claim] = [c for c in claims if c.id == job_id]
    for other in claims:
        if other.id != job_id:
            await store.release(other.id, other.token)
    await store.record_generated(job_id, claim.token, generated(), lease_seconds=60)
    await store.complete(job_id, claim.token, stored(tag))


def history_rows(db: Path) -> list[dict[str, object]]:
    with raw(db) as con:
        return [dict(r) for r in con.execute("SELECT * FROM job_history ORDER BY seq")]


async def test_redo_puts_a_done_job_back_with_its_record_kept(
    db: Path, store: JobStore, clock: FakeClock
) -> None:
    await finish(store, "a")
    await store.set_review("a", "rejected", note="too dark", keep_note=False)
    before = row(db, "a")
    clock.advance(5)
    n = await store.redo([Redo(id="a", seed=7, file="history/a.1.png")])
    assert n == 1
    after = row(db, "a")
    assert after["state"] == State.PENDING.value
    assert (after["seed"], after["manifest_seed"]) == (7, before["seed"])
    assert after["prompt"] == before["prompt"] and after["manifest_prompt"] == before["prompt"]
    # a new image is not the one judged, nor the one paid for; the money spent stays counted
    assert after["sha256"] is None and after["request_id"] is None
    assert after["review"] is None and after["review_note"] is None
    assert (after["billed"], after["cost_micros"]) == (before["billed"], before["cost_micros"])
    assert (after["attempts"], after["next_attempt_at"]) == (0, 0)
    [hist] = history_rows(db)
    assert (hist["job_id"], hist["reason"], hist["file"]) == ("a", "redo", "history/a.1.png")
    assert hist["replaced_at"] == clock.now
    record = json.loads(str(hist["record"]))
    assert record["sha256"] == before["sha256"] and record["review"] == "rejected"
    assert record["review_note"] == "too dark" and record["seed"] == before["seed"]
    # the job is made again by the next claim, with the new seed
    [claim] = await store.claim(limit=1, lease_seconds=60)
    assert (claim.id, claim.seed) == ("a", 7)


async def test_a_second_redo_keeps_the_manifest_values_of_the_first(
    db: Path, store: JobStore
) -> None:
    await finish(store, "a")
    manifest_seed = row(db, "a")["seed"]
    await store.redo([Redo(id="a", seed=7, prompt="another prompt")])
    await finish(store, "a", "y")
    await store.redo([Redo(id="a", seed=8)])
    r = row(db, "a")
    assert (r["seed"], r["prompt"]) == (8, "another prompt")
    assert (r["manifest_seed"], r["manifest_prompt"]) == (manifest_seed, "a photo of a")
    history = await _history(store)
    assert [h["record"]["seed"] for h in history] == [manifest_seed, 7]
    assert all(h["reason"] == "redo" for h in history)


async def test_reimporting_the_manifest_after_a_redo_is_not_a_change(
    db: Path, store: JobStore
) -> None:
    await finish(store, "a")
    await store.redo([Redo(id="a", seed=7, prompt="another prompt")])
    report = await store.import_specs(specs(["a", "b", "c", "d"]), source=SOURCE)
    assert (report.added, report.unchanged, report.replaced) == (0, 4, 0)
    assert row(db, "a")["seed"] == 7
    # a real change of the manifest row still replaces, and the manifest is the truth again
    changed = [
        spec("a", line=2, prompt="edited in the manifest"),
        *specs(["b", "c", "d"], first_line=3),
    ]
    report = await store.import_specs(changed, source=SOURCE, replace=True)
    assert report.replaced == 1
    r = row(db, "a")
    assert (r["prompt"], r["seed"], r["manifest_seed"], r["manifest_prompt"]) == (
        "edited in the manifest",
        42,
        None,
        None,
    )
    assert [h["reason"] for h in history_rows(db)] == ["redo", "replace"]


@pytest.mark.parametrize("state", ["pending", "running", "failed"])
async def test_redo_refuses_a_job_that_is_not_done_and_changes_nothing(
    db: Path, store: JobStore, state: str
) -> None:
    await finish(store, "a")
    if state == "running":
        await store.claim(limit=1, lease_seconds=60)  # takes b
        target = "b"
    elif state == "failed":
        [claim] = await store.claim(limit=1, lease_seconds=60)
        await store.fail(claim.id, claim.token, code="InvalidParameter", message="m")
        target = claim.id
    else:
        target = "c"
    assert states(db)[target] == state
    before = row(db, "a")
    with pytest.raises(IllegalTransition, match=f"job '{target}' is {state}"):
        await store.redo([Redo(id="a", seed=1), Redo(id=target, seed=1)])
    assert row(db, "a") == before  # all or nothing
    assert history_rows(db) == []


async def test_redo_of_an_unknown_id_is_refused(store: JobStore) -> None:
    with pytest.raises(IllegalTransition, match="'zz' does not exist"):
        await store.redo([Redo(id="zz")])


async def test_retry_keeps_the_failed_record_in_the_history(db: Path, store: JobStore) -> None:
    [claim] = await store.claim(limit=1, lease_seconds=60)
    await store.fail(
        claim.id, claim.token, code="DataInspectionFailed", message="m", request_id="r9"
    )
    assert await store.retry_failed() == 1
    [hist] = history_rows(db)
    assert (hist["job_id"], hist["reason"], hist["file"]) == (claim.id, "retry", None)
    record = json.loads(str(hist["record"]))
    assert (record["state"], record["error_code"], record["request_id"]) == (
        "failed",
        "DataInspectionFailed",
        "r9",
    )


async def test_marks_are_stored_read_back_and_counted(db: Path, store: JobStore) -> None:
    await finish(store, "a")
    await finish(store, "b", "y")
    rec = await store.set_review("a", "approved")
    assert rec["review"] == "approved" and rec["reviewed_at"] is not None
    await store.set_review("b", "rejected")
    await store.set_note("b", "the handle is bent")
    assert row(db, "b")["review"] == "rejected"  # a note keeps the mark
    assert row(db, "b")["review_note"] == "the handle is bent"
    assert (await store.stats()).reviews == {"approved": 1, "rejected": 1}
    assert [r["id"] for r in await store.records(review="rejected")] == ["b"]
    await store.set_review("a", None)
    assert (await store.stats()).reviews == {"rejected": 1}
    await store.set_note("c", "note on a pending job")  # a note is allowed anywhere
    with pytest.raises(IllegalTransition, match="'c' is pending"):
        await store.set_review("c", "approved")
    with pytest.raises(UnknownJob):
        await store.set_review("zz", "approved")
    with pytest.raises(ValueError, match="review must be"):
        await store.set_review("a", "maybe")


async def test_a_mark_does_not_disturb_a_job_in_flight(db: Path, store: JobStore) -> None:
    """A review write touches only the review columns; the run's fenced writes still apply."""
    await finish(store, "a")
    [claim] = await store.claim(limit=1, lease_seconds=60)
    await store.set_note(claim.id, "looked at it while it ran")
    await store.record_generated(claim.id, claim.token, generated(), lease_seconds=60)
    await store.complete(claim.id, claim.token, stored("z"))
    r = row(db, claim.id)
    assert (r["state"], r["review_note"]) == ("done", "looked at it while it ran")


async def test_changed_since_lists_new_and_reviewed_jobs(store: JobStore, clock: FakeClock) -> None:
    clock.advance(10)
    mark = clock.now
    assert await store.changed_since(mark) == []
    await finish(store, "a")  # claims (starts) every job, then finishes a
    changed = {r["id"]: r["state"] for r in await store.changed_since(mark)}
    assert changed == {"a": "done", "b": "pending", "c": "pending", "d": "pending"}
    clock.advance(10)
    mark = clock.now
    await store.set_note("c", "x")
    assert [r["id"] for r in await store.changed_since(mark)] == ["c"]


async def _history(store: JobStore) -> list[dict[str, object]]:
    return [h async for h in store.iter_history()]
