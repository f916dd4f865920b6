"""The pure rules of dataset output: field names, splits, keys, formats and sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.card import prompt_language
from batcher.errors import ConfigError
from batcher.export import format_for, parse_shard_size
from batcher.metadata import split_of
from batcher.records import (
    EXPORT_FIELDS,
    METADATA_FIELDS,
    export_row,
    iso_utc,
    metadata_row,
    variable_keys,
)
from batcher.shardexport import sample_key
from batcher.shards import tar_header

REC = {
    "id": "a",
    "state": "done",
    "prompt": "p",
    "size": "512*512",
    "seed": 1,
    "prompt_extend": False,
    "output": "train/a.png",
    "request_id": None,
    "width": 512,
    "height": 512,
    "sha256": "0" * 64,
    "actual_prompt": None,
    "created_at": 0.0,
    "started_at": None,
    "generated_at": 1.5,
    "finished_at": 1_700_000_000.25,
    "vars": '{"label": 3, "file_name": "mine.png", "state": "NY"}',
}


def test_a_variable_named_like_a_builtin_field_is_prefixed_not_lost():
    keys = variable_keys(["label", "file_name", "var_file_name"], METADATA_FIELDS)
    assert keys == [
        ("label", "label"),
        ("file_name", "var_file_name"),
        ("var_file_name", "var_var_file_name"),
    ]
    row = metadata_row(REC, "a.png", variable_keys(["label", "file_name"], METADATA_FIELDS))
    assert (row["file_name"], row["var_file_name"], row["label"]) == ("a.png", "mine.png", 3)
    assert row["actual_prompt"] == "p"  # the prompt as sent when the service did not rewrite it
    assert row["request_id"] == ""


def test_export_rows_have_every_field_then_the_variables_and_iso_times():
    keys = variable_keys(["label", "state", "missing"], EXPORT_FIELDS)
    row = export_row(REC, keys)
    assert list(row)[: len(EXPORT_FIELDS)] == list(EXPORT_FIELDS)
    assert (row["state"], row["var_state"], row["missing"]) == ("done", "NY", None)
    assert row["file"] == "images/train/a.png"
    assert row["created_at"] == "1970-01-01T00:00:00.000Z"
    assert row["finished_at"] == "2023-11-14T22:13:20.250Z"
    assert row["started_at"] is None
    failed = export_row({**REC, "state": "failed", "generated_at": None}, keys)
    assert failed["file"] is None and failed["actual_prompt"] is None
    assert iso_utc(None) is None


@pytest.mark.parametrize(
    ("output", "split"),
    [
        ("train/a.png", "train"),
        ("test/x/y.png", "test"),
        ("validation/a.png", "validation"),
        ("val/a.png", "val"),
        ("Train/a.png", None),
        ("photos/train/a.png", None),
        ("train.png", None),
        ("trainers/a.png", None),
    ],
)
def test_split_folders_are_the_first_folder_named_as_datasets_names_splits(output, split):
    assert split_of(output) == split


def test_the_format_follows_the_extension_and_an_unknown_one_is_refused():
    assert format_for(None, None) == "jsonl"
    assert format_for(None, Path("jobs.CSV")) == "csv"
    assert format_for(None, Path("jobs.jsonl")) == "jsonl"
    assert format_for(None, Path("ds")) == "jsonl"
    assert format_for(None, Path("x.parquet")) == "parquet"
    assert format_for("csv", Path("x.txt")) == "csv"  # said outright: taken as said
    with pytest.raises(ConfigError, match=r"'\.txt'"):
        format_for(None, Path("jobs.txt"))


@pytest.mark.parametrize(
    ("text", "size"),
    [("500MB", 500_000_000), ("1GiB", 1 << 30), ("2k", 2000), ("1.5 gb", 1_500_000_000)],
)
def test_shard_sizes(text, size):
    assert parse_shard_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "10 parsecs", "-5MB", "100"])
def test_bad_shard_sizes_are_refused(text):
    with pytest.raises(ConfigError, match="--shard-size"):
        parse_shard_size(text)


def test_webdataset_keys_have_no_dot_or_slash_and_stay_unique():
    keys = {sample_key(n, i) for n, i in enumerate(["a.b", "a_b", "a/b", "中文.1"])}
    assert len(keys) == 4
    assert all("." not in k and "/" not in k for k in keys)
    assert sample_key(3, "中文.1") == "000003_中文_1"


def test_prompt_languages():
    assert prompt_language("一只在雪地里奔跑的柴犬") == "zh"
    assert prompt_language("a cat, 4k") == "en"
    assert prompt_language("🙂 123") == "other"


@pytest.mark.parametrize(
    ("name", "size"), [("000001_a.png", 12345), ("x.json", 0), ("中文.txt", 5), ("a" * 120, 7)]
)
def test_tar_headers_are_the_ones_tarfile_writes(name, size):
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    assert tar_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def test_iso_utc_is_the_datetime_text() -> None:
    """The cached form writes what ``datetime.isoformat`` writes, at the edges of rounding."""
    from datetime import UTC, datetime
    from random import Random

    rng = Random(7)
    stamps: list[float] = [0, 0.0005, 0.9995, 1.9999995, 1_795_942_375.6777, 2**31 - 0.5]
    for _ in range(5000):
        whole = rng.randrange(0, 4_000_000_000)
        stamps += [whole, whole + rng.random(), whole + rng.choice([0.0005, 0.9999995, 0.4995])]
    for stamp in stamps:
        moment = datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")
        assert iso_utc(stamp) == moment.replace("+00:00", "Z"), stamp


def test_read_file_reads_whole_files(tmp_path: Path) -> None:
    """Whatever size the job table recorded (none, too small, too large), the file's bytes."""
    from batcher.shardexport import read_file

    for size in (0, 1, 511, 4096, 3 << 20):
        path = tmp_path / f"f{size}"
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        path.write_bytes(data)
        for recorded in (None, 0, size, max(size - 7, 0), size + 1000):
            assert read_file(str(path), recorded) == data
    with pytest.raises(FileNotFoundError):
        read_file(str(tmp_path / "missing"), 10)
