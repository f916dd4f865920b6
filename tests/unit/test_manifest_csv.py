"""CSV manifests: encodings, quoting, columns, and problems located by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.spec import JobSpec


def write(tmp_path: Path, data: str | bytes, name: str = "m.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def specs(path: Path) -> list[JobSpec]:
    return list(open_manifest(path))


def errors(path: Path) -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path))
    return info.value.errors


BASIC = "id,prompt,size,seed\na,first,1:1,1\nb,second,,\n"


@pytest.mark.parametrize(
    "data",
    [
        BASIC.encode(),
        b"\xef\xbb\xbf" + BASIC.encode(),  # UTF-8 with a BOM (what Excel writes)
        BASIC.replace("\n", "\r\n").encode(),
        BASIC.rstrip("\n").encode(),  # no final newline
        BASIC.replace("\n", "\n\n").encode(),  # blank lines between rows
        b" id , prompt ,size,seed\na,first,1:1,1\nb,second,,\n",  # padded header
    ],
)
def test_the_same_jobs_whatever_the_file_conventions(tmp_path: Path, data: bytes) -> None:
    got = specs(write(tmp_path, data))
    first = got[0]
    assert (first.id, first.prompt, first.size, first.seed) == ("a", "first", "1280*1280", 1)
    assert [s.id for s in got] == ["a", "b"]
    assert got[1].size == "1024*1536"


def test_quoted_fields_may_span_lines_and_lines_stay_right(tmp_path: Path) -> None:
    got = specs(write(tmp_path, 'id,prompt\na,"one\ntwo\nthree"\nb,"say ""hi"", twice"\nc,plain\n'))
    assert [(s.id, s.line) for s in got] == [("a", 2), ("b", 5), ("c", 6)]
    assert got[0].prompt == "one\ntwo\nthree"
    assert got[1].prompt == 'say "hi", twice'


def test_an_error_in_a_multiline_record_names_its_first_line(tmp_path: Path) -> None:
    [error] = errors(write(tmp_path, 'id,prompt,size\na,"x\ny\nz",9:9\n'))
    assert (error.line, error.field) == (2, "size")


def test_extra_columns_are_variables_and_the_header_may_be_in_any_order(tmp_path: Path) -> None:
    got = specs(
        write(tmp_path, "subject,seed,prompt,id,setting\nfox,3,{subject} {setting},a,at dawn\n")
    )
    assert (got[0].prompt, got[0].seed) == ("fox at dawn", 3)


@pytest.mark.parametrize(
    ("text", "seed"),
    [("42", 42), (" 42 ", 42), ("+7", 7), ("0", 0), ("2147483647", 2147483647), ("007", 7)],
)
def test_seeds_are_digits(tmp_path: Path, text: str, seed: int) -> None:
    assert specs(write(tmp_path, f'id,prompt,seed\na,p,"{text}"\n'))[0].seed == seed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4_2", "is not a whole number"),
        ("1.0", "is not a whole number"),
        ("1e3", "is not a whole number"),
        ("٤٢", "is not a whole number"),
        ("-1", "-1 is outside 0..2147483647"),
        ("2147483648", "outside 0..2147483647"),
        ("99999999999999999999999", "is outside 0..2147483647"),
        ("9" * 5000, "is outside 0..2147483647"),
    ],
)
def test_bad_seeds_are_located(tmp_path: Path, text: str, message: str) -> None:
    [error] = errors(write(tmp_path, f"id,prompt,seed\na,p,1\nb,p,{text}\n"))
    assert (error.line, error.field) == (3, "seed")
    assert message in error.message


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        (" yes ", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
        ("", False),
    ],
)
def test_prompt_extend_words(tmp_path: Path, text: str, value: bool) -> None:
    got = specs(write(tmp_path, f'id,prompt,prompt_extend\na,p,"{text}"\n'))
    assert got[0].prompt_extend is value


@pytest.mark.parametrize("text", ["on", "y", "2", "maybe", "truee"])
def test_other_prompt_extend_words_are_errors(tmp_path: Path, text: str) -> None:
    [error] = errors(write(tmp_path, f"id,prompt,prompt_extend\na,p,{text}\n"))
    assert (error.line, error.field) == (2, "prompt_extend")


def test_blank_records_are_skipped_and_index_counts_data_rows(tmp_path: Path) -> None:
    got = specs(write(tmp_path, "id,prompt,output\n,,\na,p,{index}\n\n, ,\nb,q,{index}\n,,\n"))
    assert [(s.id, s.output, s.line) for s in got] == [("a", "1.png", 3), ("b", "2.png", 6)]


@pytest.mark.parametrize(
    ("header", "field", "message"),
    [
        ("id,text", "prompt", "missing column; the header has: id, text"),
        ("id,prompts", "prompts", "unknown column; did you mean prompt?"),
        ("id,PROMPT", "PROMPT", "did you mean prompt?"),
        ("id,prompt,sede", "sede", "did you mean seed?"),
        ("id,prompt,prompt", "prompt", "duplicate column"),
        ("id,prompt,,x", None, "column 3 has no name"),
        ("id,prompt,index", "index", "reserved template variable; rename the column"),
    ],
)
def test_header_problems(tmp_path: Path, header: str, field: str | None, message: str) -> None:
    [error] = errors(write(tmp_path, f"{header}\n" + "a," * header.count(",") + "b\n"))
    assert (error.line, error.field) == (1, field)
    assert message in error.message


def test_a_near_miss_is_fine_when_the_field_is_present(tmp_path: Path) -> None:
    # "sizes" is a variable here: the real size column is present
    got = specs(write(tmp_path, "id,prompt,size,sizes\na,{sizes},1:1,S M L\n"))
    assert got[0].prompt == "S M L"


def test_a_row_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "id,prompt,size\na,p,1:1\nb,p\nc,p,1:1,x\n"))
    assert [(e.line, e.field, e.message) for e in found] == [
        (3, "csv", "2 fields; the header has 3"),
        (4, "csv", "4 fields; the header has 3"),
    ]


@pytest.mark.parametrize(
    ("data", "line", "field", "message"),
    [
        (b"id,prompt\na,ok\nb,caf\xe9\n", 3, "encoding", "not UTF-8 (byte 0xe9)"),
        (b"id,prompt\na,o\x00k\n", 2, "encoding", "NUL byte"),
        (b"\xff\xfei\x00d\x00", 1, "encoding", "UTF-16"),
        (b"\xfe\xff\x00i\x00d", 1, "encoding", "UTF-16"),
        ("id,prompt\na,b\n".encode("utf-16-le"), 1, "encoding", "NUL byte"),
        (b'id,prompt\na,"open\nb,c\n', 2, "csv", "unexpected end of data"),
        (b'id,prompt\na,"x"y\n', 2, "csv", "',' expected after '\"'"),
    ],
)
def test_file_problems_are_located(
    tmp_path: Path, data: bytes, line: int, field: str, message: str
) -> None:
    found = errors(write(tmp_path, data))
    assert (found[-1].line, found[-1].field) == (line, field)
    assert message in found[-1].message


@pytest.mark.parametrize("bad", [b"caf\xe9", b"n\x00l"])
def test_encoding_problems_far_into_the_file_name_their_line(tmp_path: Path, bad: bytes) -> None:
    # past several read chunks, and with multi-byte characters before it
    rows = b"".join(f"id-{n},一个提示 prompt {n}\n".encode() for n in range(20_000))
    data = b"id,prompt\n" + rows + b"x," + bad + b"\n" + b"y,after\n"
    found = errors(write(tmp_path, data))
    assert (found[-1].line, found[-1].field) == (20_002, "encoding")


def test_valid_jobs_stream_before_a_bad_row_is_reached(tmp_path: Path) -> None:
    path = write(tmp_path, "id,prompt\na,one\nb,two\nc,\nd,four\n")
    seen: list[str] = []
    with pytest.raises(ManifestInvalid) as info:
        for spec in open_manifest(path):
            seen.append(spec.id)
    assert seen == ["a", "b", "d"]
    assert [(e.line, e.field, e.message) for e in info.value.errors] == [(4, "prompt", "empty")]


def test_a_field_over_the_csv_modules_default_limit_is_read(tmp_path: Path) -> None:
    """131,072 characters is the csv module's default, not a rule of batcher's (see
    test_manifest_rules for the long-prompt warning every format gives)."""
    [_, spec] = specs(write(tmp_path, "id,prompt\na,ok\nb," + "x" * 200_000 + "\n"))
    assert len(spec.prompt) == 200_000


def test_whitespace_is_trimmed_where_it_cannot_matter(tmp_path: Path) -> None:
    [spec] = specs(write(tmp_path, 'id,prompt,size,output\n  a  ,"  a prompt  ", 16:9 , x/{id} \n'))
    assert (spec.id, spec.prompt, spec.size, spec.output) == (
        "a",
        "a prompt",
        "1536*864",
        "x/a.png",
    )
