"""What one job looks like to the outside: the fields of ``metadata.jsonl`` and of exports.

Both start from a record of :meth:`jobs.JobStore.iter_records` and add the manifest row's own
variables (its extra columns, ``vars``, matrix values) as top-level fields after the built-in
ones, typed as the manifest wrote them. A variable whose name is already a built-in field of
that output (``file_name``, ``state``, ``sha256``, ...) is written as ``var_<name>`` instead:
the built-in field keeps its meaning, and the variable is not lost.

One row per image: a job of several images (``n > 1``) is one row for each image it has
(:func:`image_records`), its ``file_name``/``file``, ``image_index``, ``sha256``, ``bytes`` and
``actual_prompt`` the image's own; a job of one image is one row, ``image_index`` 1. Every row
carries the job's model and its model parameters (``size``, ``n``, ``negative_prompt``,
``prompt_extend``, ``watermark``) as the job recorded them.

Every line of one output carries the same keys in the same order (a variable a row lacks is
``null``), so loaders that infer a schema (Hugging Face ``datasets``, pyarrow) see one schema
for the whole dataset and every split.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from jobs import State
from jobs.naming import image_output
from jobs.params import load_params

__all__ = [
    "EXPORT_FIELDS",
    "METADATA_FIELDS",
    "SPLIT_FOLDERS",
    "TIME_FIELDS",
    "actual_prompt",
    "export_row",
    "image_records",
    "iso_utc",
    "metadata_row",
    "split_of",
    "variable_keys",
    "whole_second",
]

METADATA_FIELDS = (
    "file_name",
    "id",
    "image_index",
    "model",
    "prompt",
    "seed",
    "size",
    "width",
    "height",
    "n",
    "negative_prompt",
    "prompt_extend",
    "watermark",
    "actual_prompt",
    "request_id",
    "sha256",
    "review",
)

EXPORT_FIELDS = (
    "id",
    "state",
    "model",
    "prompt",
    "size",
    "seed",
    "prompt_extend",
    "params",
    "n",
    "negative_prompt",
    "watermark",
    "file",
    "image_index",
    "request_id",
    "task_id",
    "width",
    "height",
    "sha256",
    "bytes",
    "attempts",
    "error_code",
    "error_message",
    "shortfall",
    "cost",
    "currency",
    "endpoint",
    "lane",
    "actual_prompt",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "latency_ms",
    "billed",
    "throttled",
    "ambiguous",
    "regenerated",
    "created_at",
    "started_at",
    "generated_at",
    "finished_at",
    "review",
    "review_note",
    "reviewed_at",
)
TIME_FIELDS = frozenset({"created_at", "started_at", "generated_at", "finished_at", "reviewed_at"})

# The folder names Hugging Face ``datasets`` reads as a split (its ``SPLIT_KEYWORDS``).
SPLIT_FOLDERS = frozenset(
    {"train", "training", "validation", "valid", "dev", "val", "test", "testing", "eval"}
    | {"evaluation"}
)


def split_of(output: str) -> str | None:
    """The split folder an image's output path starts with, or None.

    >>> split_of("train/photo/a.png"), split_of("photo/a.png"), split_of("test.png")
    ('train', None, None)
    """
    head, sep, _ = output.partition("/")
    return head if sep and head in SPLIT_FOLDERS else None


def variable_keys(names: Sequence[str], builtin: Sequence[str]) -> list[tuple[str, str]]:
    """(variable name, output key) for each variable, renamed ``var_<name>`` on a clash.

    >>> variable_keys(["label", "state"], ["id", "state"])
    [('label', 'label'), ('state', 'var_state')]
    """
    taken = set(builtin)
    keys: list[tuple[str, str]] = []
    for name in names:
        key = name
        while key in taken:
            key = f"var_{key}"
        taken.add(key)
        keys.append((name, key))
    return keys


def iso_utc(stamp: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC with milliseconds (``2026-01-02T03:04:05.678Z``).

    The same text as ``datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds")``
    (microseconds rounded half to even, then cut to milliseconds), built from a cached text of
    the whole second: an export writes four times per record.

    >>> iso_utc(1_795_942_375.6777)
    '2026-11-29T08:52:55.677Z'
    """
    if stamp is None:
        return None
    second = math.floor(stamp)
    micros = round((stamp - second) * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    return f"{whole_second(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def whole_second(second: int) -> str:
    """A whole Unix second as ISO 8601 UTC, to the second (``2026-11-29T08:52:55``)."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def actual_prompt(rec: Mapping[str, Any]) -> str | None:
    """The prompt the image was generated from: the service's rewrite with ``prompt_extend``,
    the job's own prompt otherwise; ``None`` for a job not generated yet. ``metadata.jsonl``
    and every export say this, so they agree."""
    if rec.get("generated_at") is None and rec.get("request_id") is None:
        return None
    return str(rec.get("actual_prompt") or rec.get("prompt"))


def image_records(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of a job: one per image of a done job of several (``rec["images"]``, see
    :meth:`jobs.JobStore.iter_records`), each with the image's ``output`` path, ``sha256``,
    ``bytes``, size, ``actual_prompt`` and ``image_index``; else the job's own record, as one
    row, ``image_index`` 1 (a job of several that is not done has no files yet).

    >>> rows = image_records({"id": "a", "state": "done", "output": "a.png", "n": 2,
    ...     "images": [{"index": 1, "sha256": "x", "bytes": 1}, {"index": 2, "sha256": "y",
    ...     "bytes": 2}]})
    >>> [(r["output"], r["image_index"], r["sha256"]) for r in rows]
    [('a-1.png', 1, 'x'), ('a-2.png', 2, 'y')]
    """
    images = rec.get("images")
    if not images or rec["state"] != State.DONE.value:
        rec["image_index"] = 1
        return [rec]
    n = int(rec.get("n") or 1)
    rows = []
    for image in images:
        if image.get("sha256") is None:
            continue  # recorded but never saved (a job done is done with every image saved)
        row = dict(rec)
        row["output"] = image_output(rec["output"], image["index"], n)
        row["image_index"] = image["index"]
        row["sha256"] = image["sha256"]
        row["bytes"] = image["bytes"]
        row["width"] = image.get("width") or rec.get("width")
        row["height"] = image.get("height") or rec.get("height")
        if image.get("actual_prompt"):
            row["actual_prompt"] = image["actual_prompt"]
        rows.append(row)
    return rows


def _params(rec: Mapping[str, Any]) -> dict[str, object]:
    text = rec.get("params")
    return load_params(text) if isinstance(text, str) else {}


def _variables(rec: Mapping[str, Any]) -> dict[str, Any]:
    text = rec.get("vars")
    return json.loads(text) if text else {}


def metadata_row(
    rec: Mapping[str, Any],
    file_name: str,
    keys: Sequence[tuple[str, str]],
    text: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """One ``metadata.jsonl`` line of a done job; ``file_name`` relative to the file's folder,
    ``keys`` from :func:`variable_keys` over :data:`METADATA_FIELDS`.

    A variable in ``text`` (one holding text anywhere in the run) that this job lacks is
    written ``""``, not ``null``: ``datasets`` reads a column that is null all through one
    split's file as another type than the same column in the other splits, and refuses the
    dataset. For the same reason ``negative_prompt`` is ``""`` and ``watermark`` false when
    the job did not give them (the service's defaults: no negative prompt, no watermark)."""
    params = _params(rec)
    row: dict[str, Any] = {
        "file_name": file_name,
        "id": rec["id"],
        "image_index": rec.get("image_index", 1),
        "model": rec.get("model"),
        "prompt": rec["prompt"],
        "seed": rec["seed"],
        "size": rec["size"],
        "width": rec["width"],
        "height": rec["height"],
        "n": rec.get("n") or 1,
        "negative_prompt": str(params.get("negative_prompt") or ""),
        "prompt_extend": rec["prompt_extend"],
        "watermark": bool(params.get("watermark", False)),
        "actual_prompt": actual_prompt(rec),
        "request_id": rec["request_id"] or "",
        "sha256": rec["sha256"],
        # "approved" / "rejected" / "" (not reviewed): text all through, one column type
        "review": rec.get("review") or "",
    }
    values = _variables(rec)
    for name, key in keys:
        value = values.get(name)
        row[key] = "" if value is None and name in text else value
    return row


def export_row(rec: Mapping[str, Any], keys: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """One export record of a job (one of :func:`image_records`): :data:`EXPORT_FIELDS`
    (``file`` relative to the run folder for a done job, times in ISO 8601 UTC; the model
    parameters as the job gave them, ``None`` when it did not), then the variables (``keys``
    from :func:`variable_keys` over :data:`EXPORT_FIELDS`)."""
    get = rec.get
    row: dict[str, Any] = {field: get(field) for field in EXPORT_FIELDS}
    params = _params(rec)
    row["n"] = get("n") or 1
    row["image_index"] = get("image_index") or 1
    row["negative_prompt"] = params.get("negative_prompt")
    row["watermark"] = params.get("watermark")
    # Set in place: a key keeps its position in the row.
    row["file"] = f"images/{rec['output']}" if rec["state"] == State.DONE.value else None
    row["actual_prompt"] = actual_prompt(rec)
    for field in TIME_FIELDS:
        row[field] = iso_utc(get(field))
    values = _variables(rec)
    for name, key in keys:
        row[key] = values.get(name)
    return row
