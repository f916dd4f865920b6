"""JSONL manifests: one object per line, typed fields, other keys as variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs.errors import ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.spec import JobSpec


def write(tmp_path: Path, data: str | bytes, name: str = "m.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def lines(*objects: object) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects)


def specs(path: Path) -> list[JobSpec]:
    return list(open_manifest(path, rules=RULES))


def errors(path: Path) -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    return info.value.errors


def test_objects_become_jobs_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    text = lines({"id": "a", "prompt": "one"}) + "\n   \n" + lines({"id": "b", "prompt": "two"})
    got = specs(write(tmp_path, text))
    assert [(s.id, s.prompt, s.line) for s in got] == [("a", "one", 1), ("b", "two", 4)]


def test_every_field(tmp_path: Path) -> None:
    [spec] = specs(
        write(
            tmp_path,
            lines(
                {
                    "id": "a",
                    "prompt": "p",
                    "size": "16:9",
                    "seed": 3,
                    "prompt_extend": True,
                    "output": "x/{id}",
                }
            ),
        )
    )
    assert (spec.size, spec.seed, spec.prompt_extend, spec.output) == (
        "1536*864",
        3,
        True,
        "x/a.png",
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), ("yes", True), ("NO", False), (1, True), (0, False)],
)
def test_prompt_extend_values(tmp_path: Path, value: object, expected: bool) -> None:
    got = specs(write(tmp_path, lines({"id": "a", "prompt": "p", "prompt_extend": value})))
    assert got[0].prompt_extend is expected


def test_null_fields_are_absent(tmp_path: Path) -> None:
    [spec] = specs(
        write(
            tmp_path,
            lines({"id": "a", "prompt": "p", "size": None, "seed": None, "output": None}),
        )
    )
    assert spec.size == "1024*1536" and spec.output == "a.png"


def test_integer_ids_are_text(tmp_path: Path) -> None:
    assert specs(write(tmp_path, lines({"id": 12, "prompt": "p"})))[0].id == "12"


def test_other_keys_and_a_vars_object_are_variables(tmp_path: Path) -> None:
    [spec] = specs(
        write(
            tmp_path,
            lines({"id": "a", "prompt": "{x} {y} {z}", "x": 1, "vars": {"y": "two", "z": False}}),
        )
    )
    assert spec.prompt == "1 two false"


@pytest.mark.parametrize(
    ("obj", "field", "message"),
    [
        ({"id": True, "prompt": "p"}, "id", "must be a string, not a boolean"),
        ({"id": 1.5, "prompt": "p"}, "id", "must be a string, not a number"),
        ({"id": "a", "prompt": 5}, "prompt", "must be a string, not a number"),
        ({"id": "a", "prompt": "p", "size": 1024}, "size", "must be a string"),
        ({"id": "a", "prompt": "p", "seed": 1.0}, "seed", "must be a whole number"),
        ({"id": "a", "prompt": "p", "seed": "7"}, "seed", "must be a whole number"),
        ({"id": "a", "prompt": "p", "seed": -3}, "seed", "-3 is outside 0..2147483647"),
        ({"id": "a", "prompt": "p", "prompt_extend": "sure"}, "prompt_extend", "true/false"),
        ({"id": "a", "prompt": "p", "prompt_extend": 2}, "prompt_extend", "true/false"),
        ({"id": "a", "prompt": "p", "output": ["x"]}, "output", "must be a string, not a list"),
        ({"id": "a", "prompt": "p", "x": None}, "x", "not null"),
        ({"id": "a", "prompt": "p", "x": [1]}, "x", "not a list"),
        ({"id": "a", "prompt": "p", "vars": {"x": {}}}, "x", "not an object"),
        (
            {"id": "a", "prompt": "p", "x": 1, "vars": {"x": 2}},
            "x",
            "given both as a key and in vars",
        ),
        ({"id": "a", "prompt": "p", "index": 1}, "index", "reserved template variable"),
        ({"id": "a", "prompt": "p", "vars": {"width": 1}}, "width", "reserved template variable"),
        ({"id": "a", "promt": "p"}, "promt", "unknown field; did you mean prompt?"),
        ({"id": "a", "prompt": "p", "Size": "1:1"}, "Size", "did you mean size?"),
        ({"id": "a"}, "prompt", "missing"),
        ({"id": "a", "prompt": ""}, "prompt", "empty"),
    ],
)
def test_type_and_key_problems_are_located(
    tmp_path: Path, obj: dict[str, object], field: str, message: str
) -> None:
    found = errors(write(tmp_path, lines({"id": "ok", "prompt": "fine"}, obj)))
    assert (found[0].line, found[0].field) == (2, field)
    assert message in found[0].message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "a", "prompt": "p"', "Expecting ',' delimiter (column 26)"),
        ("{'id': 'a'}", "Expecting property name enclosed in double quotes"),
        ('"just a string"', "expected an object"),
        ("[1, 2]", "expected an object"),
        ('{"id": "a", "prompt": "p", "w": Infinity}', "Infinity is not a number JSON allows"),
        ('{"id": "a", "id": "b", "prompt": "p"}', "duplicate key 'id'"),
        ('{"id": "a", "prompt": "p"} trailing', "Extra data"),
        ("[" * 100_000 + "]" * 100_000, ""),
    ],
)
def test_json_problems_are_located(tmp_path: Path, text: str, message: str) -> None:
    found = errors(write(tmp_path, lines({"id": "ok", "prompt": "fine"}) + text + "\n"))
    assert (found[0].line, found[0].field) == (2, "json")
    assert message in found[0].message
    assert "\n" not in found[0].format()


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (b'{"id": "a", "prompt": "ok"}\n{"prompt": "\xc3("}\n', 2, "not UTF-8 (byte 0xc3)"),
        (b'{"id": "a", "prompt": "o\x00k"}\n', 1, "NUL byte"),
        ('{"prompt": "x"}\n'.encode("utf-16"), 1, "UTF-16"),
        ('{"prompt": "x"}\n'.encode("utf-16-be"), 1, "NUL byte"),
    ],
)
def test_encoding_problems_are_located(
    tmp_path: Path, data: bytes, line: int, message: str
) -> None:
    found = errors(write(tmp_path, data))
    assert (found[-1].line, found[-1].field) == (line, "encoding")
    assert message in found[-1].message


def test_escaped_nul_and_surrogates_are_refused(tmp_path: Path) -> None:
    found = errors(
        write(
            tmp_path,
            '{"id": "a", "prompt": "x\\u0000y"}\n'
            '{"id": "b", "prompt": "x\\ud800y"}\n'
            '{"id": "c\\u0000", "prompt": "p"}\n'
            '{"id": "d", "prompt": "p", "v": "\\udfff"}\n',
        )
    )
    assert [(e.line, e.field) for e in found] == [(1, "prompt"), (2, "prompt"), (3, "id"), (4, "v")]


def test_a_bom_is_accepted(tmp_path: Path) -> None:
    got = specs(write(tmp_path, b"\xef\xbb\xbf" + lines({"id": "a", "prompt": "p"}).encode()))
    assert [s.id for s in got] == ["a"]


def test_unicode_line_separators_inside_strings_do_not_split_lines(tmp_path: Path) -> None:
    got = specs(write(tmp_path, '{"id": "a", "prompt": "one\u2028two\u0085three"}\n'))
    assert got[0].prompt == "one\u2028two\u0085three"


def test_a_variable_keeps_its_type_whatever_text_came_before(tmp_path: Path) -> None:
    """One text variable's JSON is remembered by its value: "1", 1 and 1.0 are equal dict keys
    in Python, and each must still be stored as its own JSON (a bool variable is text)."""
    values: list[object] = ["1", 1, 1.0, True, "1", "x\u00e9"]
    path = write(
        tmp_path,
        lines(*({"id": f"j{i}", "prompt": "p", "v": v} for i, v in enumerate(values))),
    )
    rows = list(open_manifest(path, rules=RULES).rows(helper=False))
    assert [row[-1] for row in rows] == [
        '{"v":"1"}',
        '{"v":1}',
        '{"v":1.0}',
        '{"v":"true"}',
        '{"v":"1"}',
        '{"v":"x\u00e9"}',
    ]
