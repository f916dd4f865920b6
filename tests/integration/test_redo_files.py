"""What redo does with files: the old image is kept under history/ (never overwriting, unique
names even within one second), and when the table refuses the move nothing is left behind."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from batcher.layout import RunLayout
from batcher.redo import RedoOptions, plan_redo, redo
from jobs import IllegalTransition, JobStore, StoredFile

from .store_support import FakeClock, generated, spec

pytestmark = pytest.mark.anyio


async def make_done(store: JobStore, layout: RunLayout, job_id: str, data: bytes) -> None:
    claims = await store.claim(limit=10, lease_seconds=60)
    [claim] = [c for c in claims if c.id == job_id]
    for other in claims:
        if other.id != job_id:
            await store.release(other.id, other.token)
    await store.record_generated(job_id, claim.token, generated(), lease_seconds=60)
    path = layout.image_path(f"shop/{job_id}.png")
    path.write_bytes(data)
    stored = StoredFile(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    await store.complete(job_id, claim.token, stored)


@pytest.fixture
async def setup(tmp_path: Path):
    layout = RunLayout(tmp_path / "run")
    clock = FakeClock()
    async with await JobStore.open(layout.db, clock=clock) as store:
        await store.import_specs(
            [spec(i, line=n + 2, output=f"shop/{i}.png") for n, i in enumerate(["a", "b", "c"])],
            source="m.csv",
        )
        yield store, layout


async def test_a_second_redo_in_the_same_second_gets_another_name(setup) -> None:
    store, layout = setup
    await make_done(store, layout, "a", b"first picture")
    items = await plan_redo(store, layout, RedoOptions(ids=("a",)))
    [first] = await redo(store, layout, items)
    await make_done(store, layout, "a", b"first picture")  # the same bytes again
    [second] = await redo(store, layout, await plan_redo(store, layout, RedoOptions(ids=("a",))))
    assert first.kept != second.kept and first.kept is not None and second.kept is not None
    assert first.kept.read_bytes() == second.kept.read_bytes() == b"first picture"
    assert first.kept.parent == layout.history / "shop"
    assert not (layout.images / "shop" / "a.png").exists()
    con = sqlite3.connect(layout.db)
    files = [f for (f,) in con.execute("SELECT file FROM job_history ORDER BY seq")]
    con.close()
    assert files == [
        first.kept.relative_to(layout.root).as_posix(),
        second.kept.relative_to(layout.root).as_posix(),
    ]


async def test_when_the_table_refuses_nothing_is_moved_or_left_behind(setup) -> None:
    store, layout = setup
    await make_done(store, layout, "a", b"picture a")
    await make_done(store, layout, "b", b"picture b")
    items = await plan_redo(store, layout, RedoOptions(ids=("a", "b")))
    # b is taken back by someone else between the plan and the redo (a --replace, say)
    con = sqlite3.connect(layout.db)
    con.execute("UPDATE jobs SET state = 'pending' WHERE id = 'b'")
    con.commit()
    con.close()
    with pytest.raises(IllegalTransition, match="'b' is pending"):
        await redo(store, layout, items)
    assert (layout.images / "shop" / "a.png").read_bytes() == b"picture a"
    assert (layout.images / "shop" / "b.png").read_bytes() == b"picture b"
    assert list(layout.history.rglob("*.png")) == []
    assert (await store.records(ids=["a"]))[0]["state"] == "done"


async def test_a_symlinked_history_folder_is_refused(setup, tmp_path: Path) -> None:
    store, layout = setup
    await make_done(store, layout, "a", b"picture a")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    layout.history.symlink_to(outside, target_is_directory=True)
    items = await plan_redo(store, layout, RedoOptions(ids=("a",)))
    with pytest.raises(Exception, match="symlink"):
        await redo(store, layout, items)
    assert list(outside.iterdir()) == []
    assert (layout.images / "shop" / "a.png").read_bytes() == b"picture a"


async def test_a_new_image_renamed_into_place_after_the_commit_is_not_removed(setup) -> None:
    """On a shared table a worker may claim a redone job as soon as redo's transaction
    commits, and rename its new image into place before redo removes the old name: the new
    image stays, the old one is kept under history/."""
    store, layout = setup
    await make_done(store, layout, "b", b"old picture")
    items = await plan_redo(store, layout, RedoOptions(ids=("b",)))
    image = layout.images / "shop" / "b.png"
    committed = store.redo

    async def commit_then_a_worker_writes(batch):  # the real store's redo, then the worker
        changed = await committed(batch)
        new = image.with_name(".b.png.part")
        new.write_bytes(b"new picture")
        new.replace(image)
        return changed

    store.redo = commit_then_a_worker_writes
    [item] = await redo(store, layout, items)
    assert image.read_bytes() == b"new picture"
    assert item.kept is not None and item.kept.read_bytes() == b"old picture"
