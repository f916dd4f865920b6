"""Rules every format shares: opening, ids, seeds, prompts, duplicates, error reporting."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs import manifest as manifest_module
from jobs.builder import derive_id, derive_seed
from jobs.errors import ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.spec import JobSpec

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def specs(path: Path) -> list[JobSpec]:
    return list(open_manifest(path, rules=RULES))


def errors(path: Path, **kwargs: int) -> ManifestInvalid:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, **kwargs, rules=RULES))
    return info.value


# ---- opening ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("m.yaml", "yaml"),
        ("m.yml", "yaml"),
        ("M.YAML", "yaml"),
        ("m.Yml", "yaml"),
        ("m.csv", "csv"),
        ("m.CSV", "csv"),
        ("m.jsonl", "jsonl"),
        ("m.JsonL", "jsonl"),
    ],
)
def test_the_format_comes_from_the_extension(tmp_path: Path, name: str, fmt: str) -> None:
    text = {
        "yaml": "jobs:\n  - id: a\n    prompt: p\n",
        "csv": "id,prompt\na,p\n",
        "jsonl": '{"id": "a", "prompt": "p"}\n',
    }[fmt]
    manifest = open_manifest(write(tmp_path, name, text), rules=RULES)
    assert manifest.format == fmt
    assert manifest.model == "z-image-turbo"
    assert manifest.path == tmp_path / name
    assert [s.id for s in manifest] == ["a"]


@pytest.mark.parametrize("name", ["m.txt", "m.json", "m.yaml.bak", "m.tsv", "m"])
def test_an_unknown_extension_is_refused_on_open(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, "id,prompt\na,p\n")
    with pytest.raises(ManifestInvalid) as info:
        open_manifest(path, rules=RULES)
    [error] = info.value.errors
    assert (error.path, error.line, error.field) == (str(path), None, None)
    assert "a manifest is .yaml, .yml, .csv or .jsonl" in error.message


@pytest.mark.parametrize("name", ["m.yaml", "m.csv", "m.jsonl"])
def test_missing_empty_and_directory_manifests_are_refused_on_open(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ManifestInvalid, match="no such file"):
        open_manifest(tmp_path / name, rules=RULES)
    with pytest.raises(ManifestInvalid, match="empty file"):
        open_manifest(write(tmp_path, name, b""), rules=RULES)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / name).mkdir()
    with pytest.raises(ManifestInvalid, match="not a file"):
        open_manifest(tmp_path / "dir" / name, rules=RULES)


def test_the_path_is_shown_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "catalog.csv", "id,prompt\na,\n")
    for given in (
        "catalog.csv",
        "./catalog.csv",
        Path("catalog.csv"),
        str(tmp_path / "catalog.csv"),
    ):
        [error] = errors(Path(given) if isinstance(given, Path) else given).errors  # type: ignore[arg-type]
        assert error.format() == f"{os.fspath(given)}:2: prompt: empty"


@pytest.mark.parametrize("name", ["catalog.yaml", "dataset.csv", "small.jsonl"])
def test_the_samples_validate(name: str) -> None:
    manifest = open_manifest(SAMPLES / name, rules=RULES)
    got = list(manifest)
    assert manifest.warnings == []
    assert len({s.id for s in got}) == len(got)
    assert len({s.output_key for s in got}) == len(got)
    minimum = {"catalog.yaml": 24, "dataset.csv": 100, "small.jsonl": 5}[name]
    assert len(got) >= minimum
    assert any(re.search(r"[\u4e00-\u9fff]", s.prompt) for s in got)
    assert any(re.fullmatch(r"[ -~]+", s.prompt) for s in got)


def test_iterating_twice_reads_the_same_jobs(tmp_path: Path) -> None:
    manifest = open_manifest(write(tmp_path, "m.csv", "id,prompt\na,one\nb,two\n"), rules=RULES)
    assert list(manifest) == list(manifest)


@pytest.mark.parametrize("name", ["catalog.yaml", "dataset.csv", "small.jsonl"])
def test_rows_are_the_jobs_as_tuples(name: str) -> None:
    manifest = open_manifest(SAMPLES / name, rules=RULES)
    jobs = list(manifest)
    rows = list(manifest.rows())
    assert rows == [spec.row() for spec in jobs]
    assert [JobSpec.from_row(row) for row in rows] == jobs
    assert all(type(row) is tuple and len(row) == 12 for row in rows)


def test_rows_check_like_iteration(tmp_path: Path) -> None:
    text = "id,prompt,seed\na,p,1\nb,p,x\nc,,3\na,p,2\nd," + "x" * 900 + ",4\n"
    path = write(tmp_path, "m.csv", text)
    found = []
    for read in (list, lambda m: list(m.rows())):
        manifest = open_manifest(path, rules=RULES)
        with pytest.raises(ManifestInvalid) as info:
            read(manifest)
        found.append([e.format() for e in info.value.errors])
        assert manifest.warning_count == 1
    assert found[0] == found[1]
    assert [line.split(": ")[1] for line in found[0]] == ["seed", "prompt", "id"]


# ---- ids ----------------------------------------------------------------------------------


def test_ids_in_any_script_are_kept(tmp_path: Path) -> None:
    ids = ["sku-001", "鞋-002", "сапог", "حذاء", "👟", "a b"]
    text = "id,prompt\n" + "".join(f"{i},p\n" for i in ids)
    assert [s.id for s in specs(write(tmp_path, "m.csv", text))] == ids


def test_a_derived_id_is_stable_and_follows_the_content(tmp_path: Path) -> None:
    first = specs(write(tmp_path, "m.csv", "prompt,size,colour\nred shoe,1:1,red\nblue,,x\n"))
    again = specs(write(tmp_path, "n.csv", "colour,size,prompt\nred,1:1,red shoe\nx,,blue\n"))
    assert [s.id for s in first] == [s.id for s in again]  # column order does not matter
    assert all(re.fullmatch(r"[0-9a-f]{16}", s.id) for s in first)
    assert first[0].id == derive_id(
        "z-image-turbo", "red shoe", "1280*1280", None, False, None, {"colour": "red"}
    )
    changed = specs(write(tmp_path, "o.csv", "prompt,size,colour\nred shoe,1:1,RED\n"))
    assert changed[0].id != first[0].id
    assert first[0].output == f"{first[0].id}.png"


def test_rows_with_the_same_content_and_no_id_are_duplicates(tmp_path: Path) -> None:
    [error] = errors(write(tmp_path, "m.csv", "prompt\nsame\nother\nsame\n")).errors
    assert (error.line, error.field) == (4, "id")
    assert "also on line 2" in error.message


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ('"a\nb"', "control character"),
        ('"a\u2028b"', "control character"),
        ("x" * 513, "513 characters; at most 512"),
    ],
)
def test_bad_ids(tmp_path: Path, cell: str, message: str) -> None:
    [error] = errors(write(tmp_path, "m.csv", f"id,prompt\n{cell},p\n")).errors
    assert (error.line, error.field) == (2, "id")
    assert message in error.message
    assert "\n" not in error.format()


def test_duplicate_ids_name_both_lines_and_a_third_names_the_first(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "m.csv", "id,prompt\nx,1\ny,2\nx,3\nx,4\n")).errors
    assert [(e.line, e.field, e.message) for e in found] == [
        (4, "id", "duplicate id 'x'; also on line 2"),
        (5, "id", "duplicate id 'x'; also on line 2"),
    ]


def test_duplicates_are_found_across_formats_of_id(tmp_path: Path) -> None:
    found = errors(
        write(tmp_path, "m.yaml", "jobs:\n  - {id: 7, prompt: a}\n  - {id: '7', prompt: b}\n")
    )
    assert found.errors[0].message == "duplicate id '7'; also on line 2"


def test_with_an_output_column_ids_and_outputs_are_checked_separately(tmp_path: Path) -> None:
    found = errors(
        write(tmp_path, "m.csv", "id,prompt,output\na,1,one\nb,2,ONE\na,3,three\n")
    ).errors
    assert [(e.line, e.field) for e in found] == [(3, "output"), (4, "id")]


def test_many_unique_rows_raise_nothing(tmp_path: Path) -> None:
    text = "id,prompt\n" + "".join(f"id-{n},prompt {n}\n" for n in range(5000))
    assert len(specs(write(tmp_path, "m.csv", text))) == 5000


def test_a_hash_collision_is_not_mistaken_for_a_duplicate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every id and output hashes alike: each job is withheld, and the second read finds that
    # none repeats a value, except the real duplicate, which still names both lines.
    monkeypatch.setattr(manifest_module, "hash", lambda value: 1, raising=False)
    text = "id,prompt\n" + "".join(f"id-{n},p\n" for n in range(50))
    assert [s.id for s in specs(write(tmp_path, "m.csv", text))] == [f"id-{n}" for n in range(50)]
    found = errors(write(tmp_path, "d.csv", text + "id-7,again\n")).errors
    assert [(e.line, e.message) for e in found] == [(52, "duplicate id 'id-7'; also on line 9")]
    found = errors(
        write(tmp_path, "o.jsonl", '{"id": "A", "prompt": "p"}\n{"id": "a", "prompt": "p"}\n')
    ).errors
    assert [(e.line, e.field) for e in found] == [(2, "output")]


# ---- seeds --------------------------------------------------------------------------------


def test_a_missing_seed_is_derived_from_the_id(tmp_path: Path) -> None:
    got = specs(write(tmp_path, "m.csv", "id,prompt,seed\na,p,\nb,p,\nc,p,5\n"))
    assert [s.seed for s in got] == [derive_seed("a"), derive_seed("b"), 5]
    assert got[0].seed != got[1].seed
    assert all(0 <= derive_seed(str(n)) <= 2_147_483_647 for n in range(2000))
    again = specs(write(tmp_path, "n.jsonl", '{"id": "a", "prompt": "other"}\n'))
    assert again[0].seed == got[0].seed


@pytest.mark.parametrize(("seed", "ok"), [(0, True), (2147483647, True), (2147483648, False)])
def test_seed_bounds(tmp_path: Path, seed: int, ok: bool) -> None:
    path = write(tmp_path, "m.jsonl", f'{{"id": "a", "prompt": "p", "seed": {seed}}}\n')
    if ok:
        assert specs(path)[0].seed == seed
    else:
        assert errors(path).errors[0].field == "seed"


# ---- prompts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "warned"),
    [("a" * 800, False), ("a" * 801, True), ("鞋" * 800, False), ("鞋" * 801, True)],
)
def test_a_long_prompt_is_a_warning_counted_in_characters(
    tmp_path: Path, prompt: str, warned: bool
) -> None:
    manifest = open_manifest(write(tmp_path, "m.csv", f"id,prompt\na,{prompt}\n"), rules=RULES)
    [spec] = list(manifest)
    assert spec.prompt == prompt
    assert [(w.line, w.field) for w in manifest.warnings] == ([(2, "prompt")] if warned else [])
    if warned:
        assert (
            manifest.warnings[0].message == "801 characters; z-image-turbo uses only the first 800"
        )


def test_warnings_are_capped_but_counted_and_reset_per_read(tmp_path: Path) -> None:
    text = "id,prompt\n" + "".join(f"{n},{'x' * 900}\n" for n in range(150))
    manifest = open_manifest(write(tmp_path, "m.csv", text), rules=RULES)
    assert len(list(manifest)) == 150
    assert (len(manifest.warnings), manifest.warning_count) == (100, 150)
    list(manifest)
    assert (len(manifest.warnings), manifest.warning_count) == (100, 150)


@pytest.mark.parametrize("prompt", ['""', '"   "', '" \t "'])
def test_an_empty_prompt_is_an_error(tmp_path: Path, prompt: str) -> None:
    [error] = errors(write(tmp_path, "m.csv", f"id,prompt,x\na,{prompt},1\n")).errors
    assert (error.line, error.field, error.message) == (2, "prompt", "empty")


# ---- error reporting ---------------------------------------------------------------------


def test_every_problem_is_collected_in_line_order(tmp_path: Path) -> None:
    text = "id,prompt,size,seed\na,,,\nb,p,9:9,\nc,p,,x\nd,ok,,\nd,dup,,\n"
    found = errors(write(tmp_path, "m.csv", text)).errors
    assert [(e.line, e.field) for e in found] == [
        (2, "prompt"),
        (3, "size"),
        (4, "seed"),
        (6, "id"),
    ]


def test_a_row_may_have_several_problems(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "m.csv", "id,prompt,size,seed\na,,9:9,99999999999\n")).errors
    assert sorted(e.field or "" for e in found) == ["prompt", "seed", "size"]


@pytest.mark.parametrize(
    ("bad_rows", "limit", "shown", "truncated"),
    [(50, 5, 5, True), (5, 5, 5, False), (4, 5, 4, False), (21, 20, 20, True)],
)
def test_errors_stop_at_max_errors(
    tmp_path: Path, bad_rows: int, limit: int, shown: int, truncated: bool
) -> None:
    text = "id,prompt\n" + "".join(f"{n},\n" for n in range(bad_rows)) + "ok,fine\n"
    invalid = errors(write(tmp_path, "m.csv", text), max_errors=limit)
    assert len(invalid.errors) == shown
    assert invalid.truncated is truncated
    assert [e.line for e in invalid.errors] == list(range(2, 2 + shown))
    assert str(invalid).count("\n") == shown - 1 + int(truncated)


def test_the_stream_stops_early_once_past_max_errors(tmp_path: Path) -> None:
    text = (
        "id,prompt\n"
        + "".join(f"{n},\n" for n in range(30))
        + "".join(f"ok{n},p\n" for n in range(10))
    )
    seen: list[str] = []
    with pytest.raises(ManifestInvalid) as info:
        for spec in open_manifest(write(tmp_path, "m.csv", text), max_errors=3, rules=RULES):
            seen.append(spec.id)
    assert seen == []  # the valid rows after the bad ones were never reached
    assert info.value.truncated


def test_messages_are_single_lines_even_for_hostile_values(tmp_path: Path) -> None:
    text = (
        'jobs:\n  - id: "a\\nb"\n    prompt: p\n'
        '  - id: ok\n    prompt: "{x\\ny}"\n'
        '  - id: ok2\n    prompt: "\\u2028"\n'
    )
    found = errors(write(tmp_path, "m.yaml", text)).errors
    assert len(found) == 3
    assert all("\n" not in e.format() and "\u2028" not in e.format() for e in found)


def test_errors_are_manifest_errors_with_their_parts(tmp_path: Path) -> None:
    [error] = errors(write(tmp_path, "m.csv", "id,prompt,size\na,p,4096*4096\n")).errors
    assert isinstance(error, ManifestError)
    assert (error.path, error.line, error.field) == (str(tmp_path / "m.csv"), 2, "size")
    assert error.message == "4096*4096 is outside 512*512..2048*2048 total pixels for z-image-turbo"


def test_hostile_column_and_key_names_stay_on_one_line(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "m.csv", 'id,"pro\nmpt","pro\nmpt"\na,b,c\n')).errors
    found += errors(
        write(tmp_path, "m.jsonl", '{"id": "a", "prompt": "p", "inde\\nx": {}}\n')
    ).errors
    found += errors(
        write(tmp_path, "m.yaml", 'jobs:\n  - {id: a, prompt: p, "pro\\nmpt": 1}\n')
    ).errors
    assert len(found) >= 3
    assert all("\n" not in e.format() for e in found)


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl", "m.yaml"])
@pytest.mark.parametrize("length", [131_072 + 1, 1_000_000])
def test_a_prompt_past_the_csv_modules_field_limit_follows_the_rule_of_every_format(
    tmp_path: Path, name: str, length: int
) -> None:
    """The csv module's default field limit (131,072 characters) is not a rule of batcher's: a
    long prompt in CSV is the same located warning as in JSONL and YAML."""
    prompt = "長" * length
    text = {
        "m.csv": f"id,prompt\na,{prompt}\n",
        "m.jsonl": f'{{"id": "a", "prompt": "{prompt}"}}\n',
        "m.yaml": f"jobs:\n  - id: a\n    prompt: {prompt}\n",
    }[name]
    manifest = open_manifest(write(tmp_path, name, text), rules=RULES)
    [spec] = list(manifest)
    assert len(spec.prompt) == length
    [warning] = manifest.warnings
    assert warning.field == "prompt" and warning.line in (2, 1, 3)
    assert warning.message == f"{length} characters; z-image-turbo uses only the first 800"


def test_a_csv_field_past_the_manifest_size_bound_is_a_located_error(tmp_path: Path) -> None:
    from jobs.csvfile import MAX_FIELD

    path = tmp_path / "m.csv"
    with path.open("w", encoding="utf-8") as fh:
        fh.write('id,prompt\na,ok\nb,"')
        fh.write("x" * (MAX_FIELD + 10))
        fh.write('"\n')
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    [error] = info.value.errors
    assert (error.line, error.field) == (3, "csv")
    assert str(MAX_FIELD) in error.message
