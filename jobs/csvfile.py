"""CSV manifests, streamed: the file is never held in memory.

A header row names the columns: ``prompt`` is required; ``id``, ``model``,
``negative_prompt``, ``size``, ``n``, ``seed``, ``prompt_extend``, ``watermark``, ``output``
and ``variants`` (jobs per row, see ``jobs.builder``) are optional (an empty cell means
absent); every other column is a template variable (unless it is a builtin variable's name or
a near miss of an absent field, ``promt``, which are errors). Lines come from
``jobs.textfile`` (UTF-8 with or without BOM, encoding problems located) and go to
``csv.reader`` in strict mode: quoted fields may span lines and a record is reported at its
first line; an unclosed quote is an error, not the rest of the file in one field. Blank
records (a spreadsheet's trailing ``,,,``) are skipped.

A field may be as long as in any other format (a long prompt is the same located warning): the
csv module's own limit of 131,072 characters is raised to ``MAX_FIELD`` (the size bound of a
YAML manifest), which only an unclosed quote swallowing the file meets, as a located error.

``iter_csv`` yields one item per record: the ``JobRow``, or ``None`` after its problems were
appended to ``errors``. A problem that makes the rest of the file unreadable is raised as a
``ManifestError``. This is the hot path of a million-row import.
"""

from __future__ import annotations

import _csv
import csv
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs.builder import JobBuilder
from jobs.errors import ManifestError
from jobs.fields import (
    MAX_N,
    MAX_SEED,
    ROW_FIELD_SET,
    ROW_FIELDS,
    extra_key_problem,
    one_line,
    parse_bool_text,
    variants_problem,
)
from jobs.spec import JobRow
from jobs.templates import Scalar
from jobs.textfile import open_text

__all__ = ["MAX_FIELD", "iter_csv"]

MAX_FIELD = 50 << 20  # characters in one field: the same bound as a whole YAML manifest

_INTEGER = re.compile(r"[+-]?[0-9]+")
_TRUE_FALSE = {"true": True, "false": False, "1": True, "0": False}


def iter_csv(
    path: Path, shown: str, builder: JobBuilder, errors: list[ManifestError]
) -> Iterator[JobRow | None]:
    """The jobs of a CSV manifest (header row first; ``prompt`` is the only required column)."""
    if csv.field_size_limit() < MAX_FIELD:  # process-wide; only ever raised, to one value
        csv.field_size_limit(MAX_FIELD)
    with open_text(path, shown) as (text, checked):
        # strict: an unclosed quote is an error, not the rest of the file in one field
        reader = csv.reader(text, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise ManifestError(shown, None, None, "empty file; expected a header row")
            columns = [name.strip() for name in header]
            if not _check_header(columns, shown, errors):
                return
            yield from _csv_rows(reader, columns, builder, errors)
        except csv.Error as exc:
            raise ManifestError(shown, reader.line_num, "csv", str(exc)) from None
        except UnicodeDecodeError as exc:
            raise checked.decode_error(exc) from None


def _csv_rows(
    reader: _csv.Reader,
    columns: list[str],
    builder: JobBuilder,
    errors: list[ManifestError],
) -> Iterator[JobRow | None]:
    # The hot path of a million-row import: plain locals, no per-row regex or dict building
    # beyond the variables, and the builder's fast paths for the rest.
    width = len(columns)
    pos = {name: i for i, name in enumerate(columns)}
    i_prompt = pos["prompt"]
    i_id, i_size, i_seed = pos.get("id"), pos.get("size"), pos.get("seed")
    i_extend, i_output = pos.get("prompt_extend"), pos.get("output")
    i_model, i_negative = pos.get("model"), pos.get("negative_prompt")
    i_n, i_watermark = pos.get("n"), pos.get("watermark")
    params = i_model is not None or i_negative is not None or i_n is not None
    params = params or i_watermark is not None
    i_variants = pos.get("variants")
    extras = [(name, i) for i, name in enumerate(columns) if name not in ROW_FIELDS]
    variables = _variables_of(extras)
    builder.outputs_from_id = i_output is None and builder.output.id_suffix is not None
    build = builder.build
    line_num = reader.line_num
    index = 0
    start = line_num + 1
    try:
        for row in reader:
            if len(row) != width:
                if row and "".join(row).strip():
                    builder.error(
                        errors, start, "csv", f"{len(row)} fields; the header has {width}"
                    )
                    yield None
                start = reader.line_num + 1
                continue
            prompt = row[i_prompt]
            if (not prompt or prompt.isspace()) and not "".join(row).strip():
                start = reader.line_num + 1
                continue  # a blank record (a spreadsheet's trailing ",,,")
            index += 1
            bad = False
            seed: int | None = None
            if i_seed is not None and (text := row[i_seed]):
                if text.isdigit() and text.isascii() and len(text) < 16:
                    seed = int(text)
                elif seed_text := text.strip():
                    if problem := _seed_problem(seed_text):
                        builder.error(errors, start, "seed", problem)
                        bad = True
                    else:
                        seed = int(seed_text)
            extend: bool | None = None
            if i_extend is not None and (text := row[i_extend]):
                extend = _TRUE_FALSE.get(text)
                if extend is None and (text := text.strip()):
                    extend = parse_bool_text(text)
                    if extend is None:
                        message = f"{text[:40]!r}: write true/false, 1/0 or yes/no"
                        builder.error(errors, start, "prompt_extend", message)
                        bad = True
            extra = _NO_MODEL_FIELDS
            if params:
                extra = _model_fields(row, i_model, i_negative, i_n, i_watermark)
                for field, problem in extra.problems:
                    builder.error(errors, start, field, problem)
                    bad = True
            count = 1
            if i_variants is not None and (text := row[i_variants].strip()):
                number = int(text) if text.isdigit() and len(text) < 8 else None
                if problem := variants_problem(number):
                    builder.error(errors, start, "variants", f"{text[:40]!r}: {problem}")
                    bad = True
                else:
                    count = number or 1
            if bad:
                yield None
            elif count > 1:
                for k in range(1, count + 1):
                    yield build(
                        errors,
                        start,
                        index,
                        (row[i_id].strip() or None) if i_id is not None else None,
                        prompt,
                        (row[i_size] or None) if i_size is not None else None,
                        seed,
                        extend,
                        (row[i_output] or None) if i_output is not None else None,
                        variables(row),
                        None,
                        "",
                        k,
                        k - 1,
                        model=extra.model,
                        n=extra.n,
                        negative_prompt=extra.negative_prompt,
                        watermark=extra.watermark,
                    )
            elif params:
                yield build(
                    errors,
                    start,
                    index,
                    (row[i_id].strip() or None) if i_id is not None else None,
                    prompt,
                    (row[i_size] or None) if i_size is not None else None,
                    seed,
                    extend,
                    (row[i_output] or None) if i_output is not None else None,
                    variables(row),
                    model=extra.model,
                    n=extra.n,
                    negative_prompt=extra.negative_prompt,
                    watermark=extra.watermark,
                )
            else:  # the common row: no model fields to pass (keywords cost a dict a call)
                yield build(
                    errors,
                    start,
                    index,
                    (row[i_id].strip() or None) if i_id is not None else None,
                    prompt,
                    (row[i_size] or None) if i_size is not None else None,
                    seed,
                    extend,
                    (row[i_output] or None) if i_output is not None else None,
                    variables(row),
                )
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ManifestError(builder.path, start, "csv", str(exc)) from None


@dataclass(frozen=True, slots=True)
class _ModelFields:
    """A row's model, negative_prompt, n and watermark cells, and their syntax problems."""

    model: str | None = None
    negative_prompt: str | None = None
    n: int | None = None
    watermark: bool | None = None
    problems: tuple[tuple[str, str], ...] = ()


_NO_MODEL_FIELDS = _ModelFields()


def _model_fields(
    row: list[str], i_model: int | None, i_negative: int | None, i_n: int | None, i_mark: int | None
) -> _ModelFields:
    model = row[i_model].strip() or None if i_model is not None else None
    negative = row[i_negative].strip() or None if i_negative is not None else None
    count: int | None = None
    watermark: bool | None = None
    problems: list[tuple[str, str]] = []
    if i_n is not None and (text := row[i_n].strip()):
        if text.isdigit() and text.isascii() and len(text) <= len(str(MAX_N)):
            count = int(text)
        else:
            problems.append(("n", f"{text[:40]!r} is not a whole number 1..{MAX_N}"))
    if i_mark is not None and (text := row[i_mark].strip()):
        watermark = parse_bool_text(text)
        if watermark is None:
            problems.append(("watermark", f"{text[:40]!r}: write true/false, 1/0 or yes/no"))
    return _ModelFields(model, negative, count, watermark, tuple(problems))


def _variables_of(extras: list[tuple[str, int]]) -> Callable[[list[str]], dict[str, Scalar]]:
    """A fast function from a row to its variables (the columns that are not fields)."""
    if not extras:
        return lambda row: {}
    if len(extras) == 1:
        [(name, i)] = extras
        return lambda row: {name: row[i]}
    names = [name for name, _ in extras]
    values = operator.itemgetter(*(i for _, i in extras))
    return lambda row: dict(zip(names, values(row), strict=True))


def _seed_problem(text: str) -> str | None:
    """Why a written seed is not ASCII digits with an optional sign that int() may take."""
    if not _INTEGER.fullmatch(text):
        return f"{text[:40]!r} is not a whole number"
    if len(text.lstrip("+-").lstrip("0")) > 15:  # int() of a huge string is slow or refused
        return f"{text[:20]}... is outside 0..{MAX_SEED}"
    return None


def _check_header(columns: list[str], path: str, errors: list[ManifestError]) -> bool:
    before = len(errors)
    seen: set[str] = set()
    for n, name in enumerate(columns, 1):
        if not name:
            errors.append(ManifestError(path, 1, None, f"column {n} has no name"))
        elif name in seen:
            errors.append(ManifestError(path, 1, one_line(name), "duplicate column"))
        seen.add(name)
    present = frozenset(seen) & ROW_FIELD_SET
    for name in columns:
        if name and name not in ROW_FIELDS:
            problem = extra_key_problem(name, present, "column")
            if problem:
                errors.append(ManifestError(path, 1, one_line(name), problem))
    if "prompt" not in seen and len(errors) == before:
        listed = one_line(", ".join(columns)[:200])
        errors.append(ManifestError(path, 1, "prompt", f"missing column; the header has: {listed}"))
    return len(errors) == before
