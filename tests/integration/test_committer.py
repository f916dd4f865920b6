"""ImageCommitter: images put in place in batches, on a real SQLite file and real folders.

Each image must still go through record_file -> rename -> complete in that order; a batch
shares the trips and the folder fsync, and one image's lost lease or disk error fails it alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from batcher.committer import ImageCommitter
from batcher.download import DiskProblem, Downloaded, _temp_path
from jobs import Claim, LeaseLost, State
from jobs.store import JobStore

from .store_support import FakeClock, generated, numbered, raw

# measures rates, quotas or elapsed time: run alone (see tests/conftest.py)
pytestmark = [pytest.mark.anyio, pytest.mark.serial]
LEASE = 60.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    s = await JobStore.open(tmp_path / "batcher.db", clock=FakeClock())
    try:
        yield s
    finally:
        await s.close()


async def generated_claims(store: JobStore, n: int) -> list[Claim]:
    await store.import_specs(numbered(n), source="m.csv")
    claims = await store.claim(limit=n, lease_seconds=LEASE)
    for c in claims:
        await store.record_generated(c.id, c.token, generated(), lease_seconds=LEASE)
    return claims


def image(dest: Path, body: bytes) -> Downloaded:
    """A verified download held in memory, as download_image returns it for a small image."""
    return Downloaded(
        temp=_temp_path(dest),
        dest=dest,
        data=body,
        sha256=hashlib.sha256(body).hexdigest(),
        bytes=len(body),
        width=1024,
        height=1024,
    )


def rows(db: Path) -> dict[str, tuple[str, str | None]]:
    with raw(db) as con:
        return {r["id"]: (r["state"], r["sha256"]) for r in con.execute("SELECT * FROM jobs")}


def body(job_id: str) -> bytes:
    return f"png of {job_id}".encode()


async def ready(
    store: JobStore, tmp_path: Path, n: int
) -> tuple[list[Claim], Path, ImageCommitter, dict[str, Downloaded]]:
    """``n`` generated jobs, an images folder, a committer, and each job's verified image."""
    claims = await generated_claims(store, n)
    folder = tmp_path / "images"
    folder.mkdir()
    items = {c.id: image(folder / f"{c.id}.png", body(c.id)) for c in claims}
    return claims, folder, ImageCommitter(store), items


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


async def test_concurrent_images_share_batches_and_all_end_done(
    store: JobStore, tmp_path: Path
) -> None:
    claims, folder, committer, items = await ready(store, tmp_path, 40)
    async with anyio.create_task_group() as tg:
        for c in claims:
            tg.start_soon(committer.commit, c.id, c.token, items[c.id])
    on_disk = rows(store.path)
    for c in claims:
        item = items[c.id]
        assert item.dest.read_bytes() == body(c.id)
        assert on_disk[c.id] == ("done", item.sha256)
    assert leftovers(folder) == []
    # 40 images arriving together: far fewer batches than images (each batch is 3 trips)
    assert 1 <= committer.batches < 40


async def test_a_lost_lease_fails_only_that_image(store: JobStore, tmp_path: Path) -> None:
    a, b, c = await generated_claims(store, 3)
    folder = tmp_path / "images"
    folder.mkdir()
    committer = ImageCommitter(store)
    items = [image(folder / f"{x.id}.png", x.id.encode()) for x in (a, b, c)]
    outcomes: dict[str, BaseException | None] = {}

    async def one(claim: Claim, token: str, item: Downloaded) -> None:
        try:
            await committer.commit(claim.id, token, item)
            outcomes[claim.id] = None
        except LeaseLost as exc:
            outcomes[claim.id] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, a, a.token, items[0])
        tg.start_soon(one, b, "not-the-token", items[1])  # someone else holds b now
        tg.start_soon(one, c, c.token, items[2])
    assert outcomes[a.id] is None and outcomes[c.id] is None
    assert isinstance(outcomes[b.id], LeaseLost)
    on_disk = rows(store.path)
    assert on_disk[a.id][0] == on_disk[c.id][0] == "done"
    assert on_disk[b.id] == ("generated", None)  # its hash was never noted, nor its file placed
    assert not items[1].dest.exists()
    assert leftovers(folder) == []


async def test_a_file_that_cannot_be_placed_fails_alone_and_keeps_its_hash(
    store: JobStore, tmp_path: Path
) -> None:
    a, b = await generated_claims(store, 2)
    good = tmp_path / "images"
    good.mkdir()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the image's folder should be")
    committer = ImageCommitter(store)
    ok = image(good / "a.png", b"a")
    bad = image(blocker / "b.png", b"b")
    errors: dict[str, BaseException] = {}

    async def one(claim: Claim, item: Downloaded) -> None:
        try:
            await committer.commit(claim.id, claim.token, item)
        except DiskProblem as exc:  # the run stops; the other images of the batch go on
            errors[claim.id] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, a, ok)
        tg.start_soon(one, b, bad)
    assert set(errors) == {b.id}
    on_disk = rows(store.path)
    assert on_disk[a.id] == ("done", ok.sha256)
    # b's hash was noted before the failed write: still generated, downloadable again
    assert on_disk[b.id] == ("generated", bad.sha256)
    assert leftovers(good) == []


async def test_a_cancelled_waiter_does_not_undo_a_batch_in_progress(
    store: JobStore, tmp_path: Path
) -> None:
    claims, folder, committer, items = await ready(store, tmp_path, 8)
    async with anyio.create_task_group() as tg:
        for c in claims:
            tg.start_soon(committer.commit, c.id, c.token, items[c.id])
        while committer.batches == 0:  # a leader has taken a batch and is running it
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    # Whatever was taken into a batch finished (shielded); the rest were never started.
    on_disk = rows(store.path)
    for c in claims:
        state, sha = on_disk[c.id]
        if state == State.DONE.value:
            assert items[c.id].dest.read_bytes() == body(c.id)
        else:
            assert (state, sha) == ("generated", None)
            assert not items[c.id].dest.exists()
    assert any(s == "done" for s, _ in on_disk.values())
    assert leftovers(folder) == []
