"""``batcher export``: one record per job, as JSON Lines or CSV, for programs and spreadsheets."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from typing import Any, TextIO

from jobs import JobStore, State

from .layout import RunLayout
from .metadata import actual_prompt

__all__ = ["EXPORT_FIELDS", "export_records", "iso_utc"]

EXPORT_FIELDS = (
    "id",
    "state",
    "prompt",
    "size",
    "seed",
    "prompt_extend",
    "file",
    "request_id",
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
)
"""The columns of an export, in order (the CSV header)."""


TIME_FIELDS = ("created_at", "started_at", "generated_at", "finished_at")


def iso_utc(seconds: float | None) -> str | None:
    """A unix time as ISO 8601 in UTC, to the millisecond (``2026-11-29T08:42:34.123Z``).

    >>> iso_utc(0.0), iso_utc(None)
    ('1970-01-01T00:00:00.000Z', None)
    """
    if seconds is None:
        return None
    when = datetime.fromtimestamp(seconds, tz=UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _export_row(layout: RunLayout, rec: dict[str, Any]) -> dict[str, Any]:
    row = {k: rec.get(k) for k in EXPORT_FIELDS if k != "file"}
    row["file"] = layout.relative(rec["output"]) if rec["state"] == State.DONE.value else None
    row["actual_prompt"] = actual_prompt(rec)  # as metadata.jsonl says it
    for key in TIME_FIELDS:
        row[key] = iso_utc(row[key])
    return {k: row[k] for k in EXPORT_FIELDS}


async def export_records(
    store: JobStore, layout: RunLayout, out: TextIO, *, fmt: str = "jsonl"
) -> int:
    """Write one record per job to ``out`` (``fmt`` ``jsonl`` or ``csv``); returns the count."""
    n = 0
    writer: Any = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, extrasaction="ignore")
        writer.writeheader()
    async for rec in store.iter_records():
        row = _export_row(layout, rec)
        if writer is not None:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        else:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    return n
