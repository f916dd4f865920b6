"""PostgreSQL's COPY text as the import writes it (jobs.backends.postgres.copy_text): the fast
f-string path must give exactly what escaping every value gives, for plain rows and for every
kind of value the text form escapes; a chunk holding one such value is escaped."""

from __future__ import annotations

import pytest

from jobs.backends.postgres import copy_text
from jobs.spec import JobRow


def reference(rows: list[JobRow], tail: tuple[object, ...]) -> bytes:
    """The text form by its definition: every value escaped, NULL as \\N."""

    def value(v: object) -> str:
        if v is None:
            return "\\N"
        if isinstance(v, str):
            for raw, escaped in (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r")):
                v = v.replace(raw, escaped)
            return v
        return str(int(v))  # type: ignore[call-overload]

    lines = ["\t".join([*(value(v) for v in r), *(str(t) for t in tail)]) for r in rows]
    return "".join(line + "\n" for line in lines).encode()


def row(job_id: str, prompt: str = "a photo", params: str | None = None) -> JobRow:
    variables = '{"k":"v"}' if params is None else None
    return (job_id, 2, "z-image-turbo", prompt, "1024*1024", 7, True, "x.png", "x.png", 1,
            params, variables)  # fmt: skip


PLAIN = [row(f"p{i}", f"plain prompt {i}, é 青") for i in range(5)]
TAIL = ("pending", 1_700_000_000.25)


def test_plain_rows_take_the_fast_path_and_match_the_definition() -> None:
    assert copy_text(PLAIN, TAIL) == reference(PLAIN, TAIL)
    assert copy_text(PLAIN) == reference(PLAIN, ())
    assert copy_text([]) == b""


@pytest.mark.parametrize(
    "odd",
    [
        row("tab", "a\tb"),
        row("lf", "line\nbreak"),
        row("cr", "carriage\rreturn"),
        row("bs", "back\\slash"),
        row("null-lookalike", "\\N"),
        row("end-marker", "\\."),
        row("params", params='{"negative_prompt":"\\"low\\""}'),
        row("empty", ""),
    ],
    ids=lambda r: r[0],
)
def test_a_chunk_with_an_odd_value_is_written_exactly(odd: JobRow) -> None:
    rows = [*PLAIN, odd, *PLAIN]
    assert copy_text(rows, TAIL) == reference(rows, TAIL)
