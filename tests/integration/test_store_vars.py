"""A manifest row's own variables, stored with its job: imported, compared, updated in place."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs import open_manifest
from jobs.errors import ManifestInvalid
from jobs.states import State
from jobs.store import JobStore
from tests.conftest import store_target

from .store_support import FakeClock, generated, row, spec, stored

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path, backend: str) -> AsyncIterator[JobStore]:
    target = store_target(backend, tmp_path / "run" / "batcher.db")
    s = await JobStore.open(target, clock=FakeClock())
    try:
        yield s
    finally:
        await s.close()


async def _import(store: JobStore, path: Path, **kw: bool) -> object:
    return await store.import_rows(open_manifest(path, rules=RULES).rows(), source=str(path), **kw)


async def test_jsonl_variables_are_stored_typed_as_written(tmp_path: Path, store: JobStore) -> None:
    m = tmp_path / "m.jsonl"
    lines = [
        {"id": "a", "prompt": "p", "label": 3, "score": 0.5, "style": "oil", "ok": True},
        {"id": "b", "prompt": "q", "vars": {"label": 4}, "extra": "x"},
        {"id": "c", "prompt": "r"},
    ]
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    await _import(store, m)
    db = store.location
    assert json.loads(row(db, "a")["vars"]) == {
        "label": 3,
        "score": 0.5,
        "style": "oil",
        "ok": "true",
    }
    assert json.loads(row(db, "b")["vars"]) == {"label": 4, "extra": "x"}
    assert row(db, "c")["vars"] is None
    found = await store.variables()
    assert list(found) == ["label", "score", "style", "ok", "extra"]
    assert found["label"] == {"integer"}
    assert found["score"] == {"real"}


async def test_csv_cells_are_text_and_yaml_matrix_values_are_variables(
    tmp_path: Path, store: JobStore
) -> None:
    m = tmp_path / "m.csv"
    m.write_text("id,prompt,label,split\na,a {label},7,train\n")
    await _import(store, m)
    assert json.loads(row(store.location, "a")["vars"]) == {"label": "7", "split": "train"}
    y = tmp_path / "y.yaml"
    y.write_text(
        "defaults: {vars: {shop: north}}\n"
        "matrix: {seed: [1, 2], angle: [front]}\n"
        "jobs:\n  - {id: sku, prompt: chair, vars: {price: 12}}\n"
    )
    async with await JobStore.open(tmp_path / "y" / "batcher.db") as other:
        await other.import_rows(open_manifest(y, rules=RULES).rows(), source=str(y))
        got = {r["id"]: json.loads(r["vars"]) async for r in other.iter_records()}
    # the seed of the matrix is the job's seed, not a variable
    assert got == {
        "sku-1-front": {"shop": "north", "price": 12, "angle": "front"},
        "sku-2-front": {"shop": "north", "price": 12, "angle": "front"},
    }


async def test_editing_a_variable_updates_it_and_keeps_the_image(
    tmp_path: Path, store: JobStore
) -> None:
    m = tmp_path / "m.csv"
    m.write_text("id,prompt,label\na,a fox,1\nb,a cat,2\n")
    await _import(store, m)
    claims = await store.claim(limit=1, lease_seconds=60)
    await store.record_generated(claims[0].id, claims[0].token, generated(), lease_seconds=60)
    await store.record_file(claims[0].id, claims[0].token, stored())
    await store.complete(claims[0].id, claims[0].token, stored())
    assert list(await store.variables()) == ["label"]
    m.write_text("id,prompt,label,kind\na,a fox,cat-1,x\nb,a cat,2,y\n")
    report = await _import(store, m)
    assert (report.added, report.replaced, report.updated) == (0, 0, 2)  # type: ignore[attr-defined]
    assert list(await store.variables()) == ["label", "kind"]  # worked out again
    a = row(store.location, "a")
    assert a["state"] == State.DONE.value and a["sha256"] is not None
    assert json.loads(a["vars"]) == {"label": "cat-1", "kind": "x"}
    # a variable used in the prompt changes the image: that is a change like any other
    m.write_text("id,prompt,label,kind\na,a fox {label},cat-1,x\nb,a cat,2,y\n")
    with pytest.raises(ManifestInvalid, match="different content"):
        await _import(store, m)
    report = await _import(store, m, replace=True)
    assert report.replaced == 1  # type: ignore[attr-defined]
    assert row(store.location, "a")["prompt"] == "a fox cat-1"


async def test_specs_carry_their_variables_and_done_records_show_them(store: JobStore) -> None:
    await store.import_specs([spec("x", vars='{"k": 1}'), spec("y"), spec("z")], source="s")
    for claim in await store.claim(limit=3, lease_seconds=60):
        if claim.id == "z":
            continue  # left running: not done, not shown
        await store.record_generated(claim.id, claim.token, generated(), lease_seconds=60)
        await store.record_file(claim.id, claim.token, stored(claim.id))
        await store.complete(claim.id, claim.token, stored(claim.id))
    recs = await store.done_records(["y", "x", "z", "missing"])
    assert [r["id"] for r in recs] == ["x", "y"]  # manifest order
    assert recs[0]["vars"] == '{"k": 1}' and recs[1]["vars"] is None
    assert recs[0]["prompt_extend"] is False and recs[0]["sha256"] == stored("x").sha256
