"""Jobs of several images (``n > 1``) against the emulator: one task makes n files, each
recorded, verified and billed; a partial success keeps what came and says what did not; a run
cut short between two downloads fetches only the missing images, with no new task."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sqlite3
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from batcher.emulator import EmulatorConfig, running_emulator
from batcher.gallery.data import collect
from batcher.layout import RunLayout
from batcher.pool import StopReason
from batcher.pricing import price_per_image
from batcher.records import export_row, image_records
from batcher.summary import status_json, status_text
from jobs import JobSpec, JobStore, State

from ..pgsupport import fresh, query
from ..support import FAST, ImageRelay, check_invariants, make_specs, run_once, serving

pytestmark = pytest.mark.anyio

TASKS = dataclasses.replace(FAST, concurrency=8, lease_seconds=30.0)


def wan(n: int, *, count: int = 1, prefix: str = "wan") -> list[JobSpec]:
    return [
        dataclasses.replace(s, model="wan2.2-t2i-flash", prompt_extend=False, n=n)
        for s in make_specs(count, size="512*512", prefix=prefix)
    ]


def image_rows(db: Path, job_id: str) -> list[tuple[int, str | None]]:
    with sqlite3.connect(db) as con:
        return con.execute(
            "SELECT idx, sha256 FROM job_images WHERE job_id = ? ORDER BY idx", (job_id,)
        ).fetchall()


async def test_a_job_of_three_images_makes_three_files_billed_three(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=21, task_seconds="0.3")
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan(3) + make_specs(1, prefix="one"), source="m.csv")
        runner, result = await run_once(store, layout, emu.base_url, options=TASKS)
        assert result.reason is StopReason.FINISHED
        s = emu.stats()
        assert s["tasks_created"] == 1
        assert s["images_billed_by_model"] == {"wan2.2-t2i-flash": 3, "z-image-turbo": 1}
        record = await store.get("wan-00000")
        assert record is not None
        assert record["state"] == State.DONE.value
        assert record["n"] == 3 and record["billed"] == 3 and record["shortfall"] is None
        price = price_per_image("wan2.2-t2i-flash", "intl", False).amount
        assert Decimal(record["cost"]) == price * 3
        assert [i["index"] for i in record["images"]] == [1, 2, 3]
        stats = await store.stats()
        assert stats.images_billed == 4
        # the report: the first image in the grid, every one in the detail view
        data = await collect(store, layout, tmp_path / "report")
        [shown] = [r for r in data.records if r["id"] == "wan-00000"]
        assert [i["file"] for i in shown["images"]] == [
            f"images/wan/wan-00000-{i}.png" for i in (1, 2, 3)
        ]
        assert shown["image"].endswith("wan/wan-00000-1.png") and shown["n"] == 3
        assert all(i["thumb"][len("thumbs/") :] in data.thumbs_wanted for i in shown["images"])
    names = sorted(p.name for p in layout.images.rglob("*.png"))
    assert names == ["one-00000.png", "wan-00000-1.png", "wan-00000-2.png", "wan-00000-3.png"]
    # three different images, each hash recorded
    rows = image_rows(layout.db, "wan-00000")
    assert len({sha for _, sha in rows}) == 3
    for index, sha in rows:
        data = (layout.images / "wan" / f"wan-00000-{index}.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
    assert check_invariants(layout.root) == {"done": 2}
    # metadata.jsonl is written by the CLI's session; the run's counters saw one generation
    assert runner.counters.generated == 2 and runner.counters.done == 2


async def test_a_partial_success_keeps_the_images_that_came_and_bills_only_those(
    tmp_path: Path,
) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(
        latency="0", rps=math.inf, seed=22, task_seconds="0.3", faults="task-partial=1"
    )
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan(4), source="m.csv")
        runner, result = await run_once(store, layout, emu.base_url, options=TASKS)
        assert result.reason is StopReason.FINISHED
        s = emu.stats()
        assert s["tasks_created"] == 1 and s["images_billed"] == 3
        record = await store.get("wan-00000")
        assert record is not None and record["state"] == State.DONE.value
        assert record["billed"] == 3 and record["image_count"] == 3
        assert record["shortfall"] == "1 of 4 images failed: InternalError.Algo: Inference error."
        price = price_per_image("wan2.2-t2i-flash", "intl", False).amount
        assert Decimal(record["cost"]) == price * 3
        assert runner.counters.cost == price * 3
        stats = await store.stats()
        assert stats.images_billed == 3 and (stats.short_jobs, stats.images_short) == (1, 1)
        text = status_text(stats, layout)
        assert "short of images: 1 done job made fewer images than asked (1 image failed" in text
        assert status_json(stats)["short_jobs"] == 1
        [row] = [
            export_row(r, []) async for job in store.iter_records() for r in image_records(job)
        ][:1]
        assert row["shortfall"] == record["shortfall"] and row["image_index"] == 1
    names = sorted(p.name for p in layout.images.rglob("*.png"))
    # the emulator fails the last slot: files keep their place in the answer
    assert names == ["wan-00000-1.png", "wan-00000-2.png", "wan-00000-3.png"]
    assert check_invariants(layout.root) == {"done": 1}


async def test_a_run_cut_between_two_downloads_fetches_only_the_missing_ones(
    tmp_path: Path,
) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=23, task_seconds="0.2")
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan(4), source="m.csv")
        relay = ImageRelay(emu.root_url)
        relay.mode, relay.pass_first = "stall", 2  # the third download hangs
        async with serving(relay.app()) as root:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_once, store, layout, root + "/api/v1")
                with anyio.fail_after(10):
                    while relay.stalled < 1:  # noqa: ASYNC110 - polls a counter
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()  # cut short, as a kill would: two images are in place
            rows = image_rows(layout.db, "wan-00000")
            assert [sha is not None for _, sha in rows] == [True, True, False, False]
            record = await store.get("wan-00000")
            assert record is not None and record["state"] == State.GENERATED.value
            relay.mode = "pass"
            before = relay.downloads
            runner, result = await run_once(store, layout, root + "/api/v1", options=TASKS)
            assert result.reason is StopReason.FINISHED
            assert relay.downloads - before == 2  # only the missing two
        s = emu.stats()
        assert s["tasks_created"] == 1 and s["images_billed"] == 4
        assert s["duplicate_billed"] == 0
        assert runner.counters.tasks_created == 0 and runner.counters.downloads_skipped == 2
        record = await store.get("wan-00000")
        assert record is not None and record["state"] == State.DONE.value
        assert record["billed"] == 4
    assert check_invariants(layout.root) == {"done": 1}


async def test_the_records_of_a_job_of_several_images_list_each_image(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=24, task_seconds="0.2")
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan(2, count=2), source="m.csv")
        await run_once(store, layout, emu.base_url, options=TASKS)
        assert await store.done_images() == 4
        records = [r async for r in store.iter_records(state=State.DONE)]
        assert [len(r["images"]) for r in records] == [2, 2]
        done = await store.done_records([r["id"] for r in records])
        assert all(len(r["images"]) == 2 and r["model"] == "wan2.2-t2i-flash" for r in done)
        assert all(image["sha256"] for r in done for image in r["images"])


async def test_jobs_of_several_images_on_postgresql(tmp_path: Path) -> None:
    """The shared job table keeps the images of a job the same way: recorded with the
    generation, each hash before its file is in place, a partial success kept."""
    url = fresh()
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(
        latency="0", rps=math.inf, seed=25, task_seconds="0.2", faults="task-partial=0.5"
    )
    async with await JobStore.open(url) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan(4, count=4), source="m.csv")
        _, result = await run_once(store, layout, emu.base_url, options=TASKS)
        assert result.reason is StopReason.FINISHED
        s = emu.stats()
        records = [r async for r in store.iter_records(state=State.DONE)]
        assert len(records) == 4
        came = sum(len(r["images"]) for r in records)
        assert came == s["images_billed"] == sum(r["billed"] for r in records)
        short = [r for r in records if r["shortfall"]]
        assert 0 < len(short) < 4 and all(len(r["images"]) == 3 for r in short)
        assert await store.done_images() == came
        stats = await store.stats()
        assert (stats.short_jobs, stats.images_short) == (len(short), len(short))
    files = sorted(p.name for p in layout.images.rglob("*.png"))
    assert len(files) == came
    rows = query(url, "SELECT count(*) AS c FROM job_images WHERE sha256 IS NOT NULL")
    assert rows == [{"c": came}]


async def test_the_budget_counts_every_image_of_a_job(tmp_path: Path) -> None:
    """--budget: a job of n images costs n images; the job that would pass it is not started."""
    layout = RunLayout(tmp_path / "run")
    cfg = EmulatorConfig(latency="0", rps=math.inf, seed=26, task_seconds="0.2")
    async with await JobStore.open(layout.db) as store, running_emulator(cfg) as emu:
        await store.import_specs(wan(2, count=2), source="m.csv")
        options = dataclasses.replace(TASKS, budget=Decimal("0.06"), concurrency=1)
        runner, result = await run_once(store, layout, emu.base_url, options=options)
        assert result.reason is StopReason.BUDGET
        assert result.abort_message is not None and "x 2 image(s)" in result.abort_message
        assert emu.stats()["images_billed"] == 2 and runner.counters.cost == Decimal("0.050")
        assert (await store.stats()).count(State.DONE) == 1
