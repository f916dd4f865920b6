"""The records :mod:`batcher.leanexport` builds from the columns it reads (each value encoded
on its own, then one template) are the bytes :func:`batcher.records.export_row` and the
general path's encoder make of the same row, for random values: any string SQLite can hold
(control characters, U+2028/2029, astral characters, quotes, backslashes, a NUL), integers of
any size, NULLs, floats, times, costs, model parameters, variables of every JSON type; by
the Python loop and by the C loop."""

from __future__ import annotations

import json
import os
import sqlite3
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher import leanexport
from batcher.card import CardFacts
from batcher.layout import RunLayout
from batcher.records import EXPORT_FIELDS, export_row, image_records, split_of, variable_keys
from batcher.shardexport import sample_key
from batcher.shards import ShardSet, TarShards
from bench.dataset_fixture import fabricate

_JSON = json.JSONEncoder(ensure_ascii=False)
_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_ODD = st.sampled_from(["", "\x00", "\u2028", "\u2029", '"', "\\", "\x7f", "\U0001f600", "%s"])
_STRING = st.one_of(_TEXT, st.lists(_ODD, max_size=6).map("".join))
_OPTIONAL = st.one_of(st.none(), _STRING)
_TIME = st.floats(min_value=0, max_value=4e9, allow_nan=False)
_LATENCY = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False))
_VALUE = st.one_of(
    st.none(), st.booleans(), _INT64, st.floats(allow_nan=False, allow_infinity=False), _STRING
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lean-records") / "run"
    anyio.run(fabricate, root, 2)
    return root


class _Samples:
    """A writer that keeps what it is given."""

    def __init__(self) -> None:
        self.samples: list[tuple[str, str, bytes | None, bytes, bytes]] = []

    def add_sample(
        self, split: str, key: str, png: bytes | None, record: bytes, text: bytes
    ) -> None:
        self.samples.append((split, key, png, record, text))


row_values = st.fixed_dictionaries(
    {
        "prompt": _STRING,
        "model": _STRING,
        "size": _STRING,
        "seed": _INT64,
        "prompt_extend": st.integers(0, 1),
        "params": st.one_of(
            st.none(),
            st.just(""),
            st.fixed_dictionaries(
                {"negative_prompt": _OPTIONAL, "watermark": st.one_of(st.none(), st.booleans())}
            ).map(json.dumps),
        ),
        "state": st.sampled_from(["done", "failed", "pending"]),
        "n": st.sampled_from([0, 1, 2]),
        "request_id": _OPTIONAL,
        "task_id": _OPTIONAL,
        "width": st.one_of(st.none(), _INT64),
        "sha256": _OPTIONAL,
        "attempts": _INT64,
        "error_code": _OPTIONAL,
        "error_message": _OPTIONAL,
        "shortfall": _OPTIONAL,
        "cost_micros": st.one_of(_INT64, st.integers(0, 10**8)),
        "currency": _OPTIONAL,
        "endpoint": st.one_of(_OPTIONAL, st.just("emulator")),
        "lane": _OPTIONAL,
        "actual_prompt": _OPTIONAL,
        "input_tokens": st.one_of(st.none(), _INT64),
        "latency_ms": _LATENCY,
        "billed": st.integers(0, 1),
        "created_at": _TIME,
        "started_at": st.one_of(st.none(), _TIME),
        "generated_at": st.one_of(st.none(), _TIME),
        "finished_at": st.one_of(st.none(), _TIME),
        "review": _OPTIONAL,
        "review_note": _OPTIONAL,
        "reviewed_at": st.one_of(st.none(), _TIME),
        "vars": st.one_of(
            st.none(),
            st.fixed_dictionaries({}, optional={"label": _VALUE, "style": _VALUE}).map(
                lambda d: json.dumps(d, ensure_ascii=False)
            ),
        ),
    }
)


def _fetch(db: sqlite3.Connection) -> leanexport.Fetch:
    return lambda sql, params: db.execute(sql, params).fetchall()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=row_values)
def test_the_python_loops_records_are_the_encoders(
    run: Path, values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Python loop, fed the row in a transaction of its own connection."""
    monkeypatch.setenv("BATCHER_PURE_PYTHON", "1")
    db = sqlite3.connect(run / "batcher.db", isolation_level=None)
    try:
        db.execute("BEGIN")
        sets = ", ".join(f"{name} = ?" for name in values)
        db.execute(f"UPDATE jobs SET {sets} WHERE rowid = 1", tuple(values.values()))
        keys = variable_keys(["label", "style"], EXPORT_FIELDS)
        writer = _Samples()
        leanexport._write(db, RunLayout(run), None, None, keys, writer, CardFacts())  # type: ignore[arg-type]
        rec = leanexport._record(_fetch(db), 1)
        expected = image_records(rec)[0]
        split, key, _png, record, text = writer.samples[0]
        assert record == _JSON.encode(export_row(expected, keys)).encode()
        assert text == values["prompt"].encode()
        assert split == (split_of(rec["output"]) or "data")
        n = rec["n"] or 1
        assert key == sample_key(0, rec["id"] if n == 1 else f"{rec['id']}-1")
    finally:
        db.execute("ROLLBACK")
        db.close()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=row_values)
def test_the_c_loops_records_are_the_encoders(
    run: Path, values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C loop (:mod:`batcher._speedups`, which reads the table on a connection of its
    own: the row is committed), its samples read back from the tar shard it wrote."""
    monkeypatch.delenv("BATCHER_PURE_PYTHON", raising=False)
    if leanexport._speedups() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("batcher._speedups was not built (pip install -e . with a C compiler)")
        pytest.skip("batcher._speedups is not built here (no C compiler at install)")
    sets = ", ".join(f"{name} = ?" for name in values)
    with sqlite3.connect(run / "batcher.db") as db:
        db.execute(f"UPDATE jobs SET {sets} WHERE rowid = 1", tuple(values.values()))
    db = sqlite3.connect(run / "batcher.db")
    try:
        keys = variable_keys(["label", "style"], EXPORT_FIELDS)
        with tempfile.TemporaryDirectory() as folder:
            shards = ShardSet(folder=Path(folder), ext="tar", with_count=False)
            writer = TarShards(shards, 1 << 30)
            leanexport._write(db, RunLayout(run), None, None, keys, writer, CardFacts())
            writer.close()
            rec = leanexport._record(_fetch(db), 1)
            split = split_of(rec["output"]) or "data"
            n = rec["n"] or 1
            key = sample_key(0, rec["id"] if n == 1 else f"{rec['id']}-1")
            (shard,) = shards.written[split]
            with tarfile.open(shard) as tar:
                record = _member(tar, f"{key}.json")
                text = _member(tar, f"{key}.txt")
        expected = image_records(rec)[0]
        assert record == _JSON.encode(export_row(expected, keys)).encode()
        assert text == values["prompt"].encode()
    finally:
        db.close()


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    got = tar.extractfile(name)
    assert got is not None, name
    return got.read()
