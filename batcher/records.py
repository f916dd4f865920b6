"""What one job looks like to the outside: the fields of ``metadata.jsonl`` and of exports.

Both start from a record of :meth:`jobs.JobStore.iter_records` and add the manifest row's own
variables (its extra columns, ``vars``, matrix values) as top-level fields after the built-in
ones, typed as the manifest wrote them. A variable whose name is already a built-in field of
that output (``file_name``, ``state``, ``sha256``, ...) is written as ``var_<name>`` instead:
the built-in field keeps its meaning, and the variable is not lost.

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

__all__ = [
    "EXPORT_FIELDS",
    "METADATA_FIELDS",
    "TIME_FIELDS",
    "actual_prompt",
    "export_row",
    "iso_utc",
    "metadata_row",
    "variable_keys",
]

METADATA_FIELDS = (
    "file_name",
    "id",
    "prompt",
    "seed",
    "size",
    "width",
    "height",
    "prompt_extend",
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
    "file",
    "request_id",
    "task_id",
    "width",
    "height",
    "sha256",
    "bytes",
    "attempts",
    "error_code",
    "error_message",
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
    return f"{_whole_second(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _whole_second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def actual_prompt(rec: Mapping[str, Any]) -> str | None:
    """The prompt the image was generated from: the service's rewrite with ``prompt_extend``,
    the job's own prompt otherwise; ``None`` for a job not generated yet. ``metadata.jsonl``
    and every export say this, so they agree."""
    if rec.get("generated_at") is None and rec.get("request_id") is None:
        return None
    return str(rec.get("actual_prompt") or rec.get("prompt"))


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
    dataset."""
    row: dict[str, Any] = {
        "file_name": file_name,
        "id": rec["id"],
        "prompt": rec["prompt"],
        "seed": rec["seed"],
        "size": rec["size"],
        "width": rec["width"],
        "height": rec["height"],
        "prompt_extend": rec["prompt_extend"],
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
    """One export record of any job: :data:`EXPORT_FIELDS` (``file`` relative to the run
    folder for a done job, times in ISO 8601 UTC), then the variables (``keys`` from
    :func:`variable_keys` over :data:`EXPORT_FIELDS`)."""
    get = rec.get
    row: dict[str, Any] = {field: get(field) for field in EXPORT_FIELDS}
    # Set in place: a key keeps its position in the row.
    row["file"] = f"images/{rec['output']}" if rec["state"] == State.DONE.value else None
    row["actual_prompt"] = actual_prompt(rec)
    for field in TIME_FIELDS:
        row[field] = iso_utc(get(field))
    values = _variables(rec)
    for name, key in keys:
        row[key] = values.get(name)
    return row
