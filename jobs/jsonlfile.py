"""JSONL manifests, streamed: one JSON object per line, blank lines skipped.

Keys ``id``, ``model``, ``prompt``, ``negative_prompt``, ``size``, ``n``, ``seed``,
``prompt_extend``, ``watermark``, ``output`` and ``variants`` (jobs per object, see
``jobs.builder``) are the job's fields (``null`` means absent); a ``vars`` object and every
other key are template variables, scalars only. Duplicate keys, ``NaN``/``Infinity``, escaped
NUL characters in a prompt and unpaired surrogates are refused. Lines come from
``jobs.textfile`` (UTF-8 with or without BOM, encoding problems located).

``iter_jsonl`` yields one item per object: the ``JobRow``, or ``None`` after its problems
were appended to ``errors``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from jobs.builder import JobBuilder
from jobs.errors import ManifestError
from jobs.fields import (
    BUILTIN_VARS,
    ROW_FIELD_SET,
    extra_key_problem,
    parse_bool_text,
    text_problem,
    variants_problem,
)
from jobs.spec import JobRow
from jobs.templates import Scalar
from jobs.textfile import open_text

__all__ = ["iter_jsonl"]


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number JSON allows")


def iter_jsonl(
    path: Path, shown: str, builder: JobBuilder, errors: list[ManifestError]
) -> Iterator[JobRow | None]:
    """The jobs of a JSONL manifest: one object per line; keys not a field are variables."""
    with open_text(path, shown) as (text, checked):
        index = 0
        try:
            for number, line in enumerate(text, 1):
                if not line or line.isspace():
                    continue
                try:
                    obj = json.loads(
                        line.rstrip("\r\n"), object_pairs_hook=_pairs, parse_constant=_no_constant
                    )
                except json.JSONDecodeError as exc:
                    builder.error(errors, number, "json", f"{exc.msg} (column {exc.colno})")
                    yield None
                    continue
                except (ValueError, RecursionError) as exc:
                    builder.error(errors, number, "json", str(exc) or type(exc).__name__)
                    yield None
                    continue
                if type(obj) is not dict:
                    builder.error(errors, number, "json", "expected an object {...} on each line")
                    yield None
                    continue
                index += 1
                job = _jsonl_job(obj, number, index, builder, errors)
                if isinstance(job, list):  # a row with variants: one job each
                    yield from job
                else:
                    yield job
        except UnicodeDecodeError as exc:
            raise checked.decode_error(exc) from None


def _jsonl_job(
    obj: dict[str, object], line: int, index: int, builder: JobBuilder, errors: list[ManifestError]
) -> JobRow | list[JobRow | None] | None:
    before = len(errors)
    texts: dict[str, str] = {}  # id, model, prompt, negative_prompt, size, output
    seed: int | None = None
    images: int | None = None  # n, the images one call makes
    extend: bool | None = None
    watermark: bool | None = None
    count = 1  # variants: jobs made of this object
    variables: dict[str, Scalar] = {}
    present = frozenset(obj) & ROW_FIELD_SET
    for key, value in obj.items():
        if key in ROW_FIELD_SET:
            problem: str | None = None
            if value is None:
                continue  # null means absent
            if key == "seed":
                if isinstance(value, int) and not isinstance(value, bool):
                    seed = value
                else:
                    problem = "must be a whole number"
            elif key == "n":
                if _is_int(value):
                    images = int(str(value))
                else:
                    problem = "must be a whole number"
            elif key == "variants":
                if (problem := variants_problem(value)) is None:
                    assert isinstance(value, int)
                    count = value
            elif key == "prompt_extend":
                extend = _flag(value)
                if extend is None:
                    problem = "write true/false, 1/0 or yes/no"
            elif key == "watermark":
                watermark = _flag(value)
                if watermark is None:
                    problem = "write true/false, 1/0 or yes/no"
            elif key == "id" and _is_int(value):
                texts[key] = str(value)
            elif not isinstance(value, str):
                problem = f"must be a string, not {_json_type(value)}"
            elif (problem := text_problem(value)) is None:
                texts[key] = value
            if problem:
                builder.error(errors, line, key, problem)
            continue
        if key == "vars" and isinstance(value, dict):
            pairs: Iterable[tuple[str, object]] = value.items()
        elif problem := extra_key_problem(key, present):
            builder.error(errors, line, key, problem)
            continue
        else:
            pairs = ((key, value),)
        for name, item in pairs:
            scalar, problem = _scalar(item)
            if problem is None:
                if name in BUILTIN_VARS:
                    problem = "reserved template variable; rename it"
                elif name in variables:
                    problem = "given both as a key and in vars"
            if problem:
                builder.error(errors, line, name, problem)
            else:
                variables[name] = scalar
    if len(errors) > before:
        return None
    if count == 1:
        return builder.build(
            errors,
            line,
            index,
            texts.get("id"),
            texts.get("prompt"),
            texts.get("size"),
            seed,
            extend,
            texts.get("output"),
            variables,
            model=texts.get("model"),
            n=images,
            negative_prompt=texts.get("negative_prompt"),
            watermark=watermark,
        )
    return [
        builder.build(
            errors,
            line,
            index,
            texts.get("id"),
            texts.get("prompt"),
            texts.get("size"),
            seed,
            extend,
            texts.get("output"),
            variables,
            None,
            "",
            k,
            k - 1,
            model=texts.get("model"),
            n=images,
            negative_prompt=texts.get("negative_prompt"),
            watermark=watermark,
        )
        for k in range(1, count + 1)
    ]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(value: object) -> bool | None:
    """prompt_extend as JSON writes it: a boolean, 0/1, or true/false/yes/no text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_bool_text(value)
    if _is_int(value) and value in (0, 1):
        return bool(value)
    return None


def _scalar(value: object) -> tuple[Scalar, str | None]:
    """A template variable's value, or a problem."""
    if isinstance(value, str):
        return value, text_problem(value)
    if isinstance(value, bool):
        return ("true" if value else "false"), None
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value, None
    return "", f"must be a string, number or boolean, not {_json_type(value)}"


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", type(None): "null", bool: "a boolean"}
    return names.get(type(value), "a number")
