"""The store's side of "the manifest is the source of truth", on a real SQLite file: withdrawn
jobs, their return, output moves, and money per currency kept apart from the emulator's."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from jobs import EMULATOR_ENDPOINT, ManifestInvalid, Spend
from jobs.states import State
from jobs.store import JobStore
from tests.conftest import store_target

from .store_support import FakeClock, generated, raw, row, spec, specs, states, stored

pytestmark = pytest.mark.anyio

SOURCE = "m.csv"


@pytest.fixture
def db(tmp_path: Path, backend: str) -> Path:
    """The store's SQLite file, or (backend ``postgres``) the URL of an empty database."""
    return store_target(backend, tmp_path / "run" / "batcher.db")  # type: ignore[return-value]


@pytest.fixture
async def store(db: Path) -> AsyncIterator[JobStore]:
    s = await JobStore.open(db, clock=FakeClock())
    try:
        yield s
    finally:
        await s.close()


async def finish(store: JobStore, job_id: str, tag: str = "x", **gen: object) -> None:
    """Take ``job_id`` (and only it) through claim, generation and completion."""
    for c in await store.claim(limit=100, lease_seconds=60):
        if c.id != job_id:
            await store.release(c.id, c.token)
            continue
        await store.record_generated(
            c.id, c.token, dataclasses.replace(generated(), **gen), lease_seconds=60
        )
        await store.complete(c.id, c.token, stored(tag))


async def test_rows_that_left_are_withdrawn_never_claimed_and_come_back(db, store):
    await store.import_specs(specs(["a", "b", "c", "d"]), source=SOURCE, withdraw=True)
    await finish(store, "a")
    failed = [c for c in await store.claim(limit=4, lease_seconds=60) if c.id == "b"]
    await store.fail(failed[0].id, failed[0].token, code="X", message="m")
    await store.reclaim(all_running=True)
    report = await store.import_specs(specs(["c"]), source=SOURCE, withdraw=True)
    assert report.withdrawn == 3 and report.added == 0
    assert states(db) == {"a": "withdrawn", "b": "withdrawn", "c": "pending", "d": "withdrawn"}
    assert [c.id for c in await store.claim(limit=10, lease_seconds=60)] == ["c"]
    assert row(db, "a")["sha256"] == ("x" * 64)  # kept with its record
    stats = await store.stats()
    assert stats.count(State.WITHDRAWN) == 3
    back = await store.import_specs(specs(["a", "b", "c", "d"]), source=SOURCE, withdraw=True)
    assert back.restored == 3 and back.withdrawn == 0
    assert states(db) == {"a": "done", "b": "failed", "c": "running", "d": "pending"}


async def test_without_withdraw_an_import_only_adds(db, store):
    await store.import_specs(specs(["a", "b"]), source=SOURCE)
    report = await store.import_specs(specs(["c"]), source=SOURCE)
    assert report.withdrawn == 0
    assert set(states(db).values()) == {"pending"}


async def test_a_running_job_is_left_to_its_run_and_withdrawn_by_the_next_import(db, store):
    await store.import_specs(specs(["a", "b"]), source=SOURCE, withdraw=True)
    claims = await store.claim(limit=1, lease_seconds=60)
    assert [c.id for c in claims] == ["a"]
    await store.import_specs(specs(["b"]), source=SOURCE, withdraw=True)
    assert states(db)["a"] == "running"
    await store.release(claims[0].id, claims[0].token)
    await store.import_specs(specs(["b"]), source=SOURCE, withdraw=True)
    assert states(db)["a"] == "withdrawn"


async def test_a_new_row_takes_the_path_of_a_leaving_job_which_starts_over_if_it_returns(db, store):
    await store.import_specs([spec("old", output="chair.png")], source=SOURCE, withdraw=True)
    await finish(store, "old")
    report = await store.import_specs(
        [spec("new", output="chair.png")], source=SOURCE, withdraw=True
    )
    assert (report.added, report.withdrawn) == (1, 1)
    assert row(db, "old")["sha256"] is None  # its image gives way to the new one's
    with raw(db) as con:
        reasons = con.execute("SELECT job_id, reason, file FROM job_history").fetchall()
    assert [tuple(r) for r in reasons] == [("old", "withdrawn", "chair.png")]
    # both rows in the manifest with one path: refused as ever
    with pytest.raises(ManifestInvalid):
        await store.import_specs(
            [spec("new", output="chair.png"), spec("old", output="chair.png", line=3)],
            source=SOURCE,
            withdraw=True,
        )
    back = await store.import_specs([spec("old", output="chair.png")], source=SOURCE, withdraw=True)
    assert back.restored == 1
    assert states(db) == {"old": "pending", "new": "withdrawn"}
    assert row(db, "old")["output_key"] == "chair.png"


async def test_an_output_change_moves_the_job_and_records_the_file_move(db, store):
    await store.import_specs(
        [spec("a", output="x/a.png"), spec("b", output="x/b.png", line=3)],
        source=SOURCE,
        withdraw=True,
    )
    await finish(store, "a")
    # a and b swap paths: no collision, no --replace needed, nothing to generate again
    report = await store.import_specs(
        [spec("a", output="x/b.png"), spec("b", output="x/a.png", line=3)],
        source=SOURCE,
        withdraw=True,
    )
    assert (report.moved, report.replaced, report.unchanged) == (2, 0, 0)
    assert states(db) == {"a": "done", "b": "pending"}
    assert (row(db, "a")["output"], row(db, "a")["output_key"]) == ("x/b.png", "x/b.png")
    moves = await store.pending_moves()
    assert [(m.job_id, m.old, m.new) for m in moves] == [("a", "x/a.png", "x/b.png")]
    await store.finish_moves([m.seq for m in moves])
    assert await store.pending_moves() == []


async def test_spend_is_per_currency_and_the_emulators_apart(db, store):
    await store.import_specs(specs(["a", "b", "c"]), source=SOURCE)
    await finish(store, "a", "a", cost=Decimal("0.10"), currency="CNY", endpoint="https://cn")
    await finish(store, "b", "b", cost=Decimal("0.015"), currency="USD", endpoint="https://i")
    await finish(store, "c", "c", cost=Decimal("0.015"), currency="USD", endpoint=EMULATOR_ENDPOINT)
    stats = await store.stats()
    assert stats.spend == (
        Spend(
            currency="CNY", emulated=False, images=1, amount=Decimal("0.10"), model="z-image-turbo"
        ),
        Spend(
            currency="USD", emulated=False, images=1, amount=Decimal("0.015"), model="z-image-turbo"
        ),
        Spend(
            currency="USD", emulated=True, images=1, amount=Decimal("0.015"), model="z-image-turbo"
        ),
    )
    assert stats.spent() == {"CNY": Decimal("0.10"), "USD": Decimal("0.015")}
    assert stats.spent(emulated=True) == {"USD": Decimal("0.015")}
    assert (stats.images_billed, stats.images_emulated) == (2, 1)
    with pytest.raises(ValueError, match="several currencies"):
        _ = stats.cost
    assert await store.endpoints() == {"https://cn": 1, "https://i": 1, EMULATOR_ENDPOINT: 1}


async def test_moves_left_half_done_by_a_crash_are_finished_by_the_next_import(tmp_path, store):
    """A crash after the import committed (moves recorded) and after one image was set aside:
    the next apply_moves finishes both, swapping two paths through the side folder."""
    from batcher.importing import apply_moves
    from batcher.layout import RunLayout

    layout = RunLayout(tmp_path / "run")
    await store.import_specs(
        [spec("a", output="x/a.png"), spec("b", output="x/b.png", line=3)], source=SOURCE
    )
    await finish(store, "a", "a")
    await finish(store, "b", "b")
    (layout.images / "x").mkdir(parents=True)
    (layout.images / "x" / "a.png").write_bytes(b"image of a")
    (layout.images / "x" / "b.png").write_bytes(b"image of b")
    await store.import_specs(
        [spec("a", output="x/b.png"), spec("b", output="y/a.png", line=3)],
        source=SOURCE,
        withdraw=True,
    )
    moves = {m.job_id: m for m in await store.pending_moves()}
    # the crash: a's image was already set aside, b's not moved yet
    aside = layout.root / ".moving"
    aside.mkdir()
    (layout.images / "x" / "a.png").rename(aside / f"{moves['a'].seq}.png")
    assert await apply_moves(store, layout) == 2
    assert (layout.images / "x" / "b.png").read_bytes() == b"image of a"
    assert (layout.images / "y" / "a.png").read_bytes() == b"image of b"
    assert not (layout.images / "x" / "a.png").exists() and not aside.exists()
    assert await store.pending_moves() == []
    assert await apply_moves(store, layout) == 0


async def test_the_folder_remembers_its_endpoints_and_refuses_another(tmp_path, db, store):
    from batcher.errors import ConfigError
    from batcher.folder import ENDPOINTS_KEY, check_folder_endpoint

    root = tmp_path / "run"
    await store.import_specs(specs(["a", "b", "c"]), source=SOURCE)
    await check_folder_endpoint(store, "https://one/api/v1", root)
    assert await store.get_meta(ENDPOINTS_KEY) == '["https://one/api/v1"]'
    await finish(store, "a", endpoint="https://one/api/v1")
    await check_folder_endpoint(store, "https://one/api/v1", root)  # the same: goes on
    for other in (EMULATOR_ENDPOINT, "https://two/api/v1"):
        with pytest.raises(ConfigError, match="--out"):
            await check_folder_endpoint(store, other, root)
    # images of a folder from before endpoints were recorded: paid, at an unknown endpoint
    await finish(store, "b", endpoint=None)
    await store.set_meta(ENDPOINTS_KEY, "[null]")
    with raw(db) as con:
        con.execute("UPDATE jobs SET endpoint = NULL")
    with pytest.raises(ConfigError, match="paid"):
        await check_folder_endpoint(store, EMULATOR_ENDPOINT, root)
    await check_folder_endpoint(store, "https://two/api/v1", root)
    assert await store.get_meta(ENDPOINTS_KEY) == '["https://two/api/v1", null]'
