"""``batcher export``: one record per job, as JSON Lines or CSV, for programs and spreadsheets."""

from __future__ import annotations

import csv
import json
from typing import Any, TextIO

from jobs import JobStore, State

from .layout import RunLayout

__all__ = ["EXPORT_FIELDS", "export_records"]

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
    "review",
    "review_note",
    "reviewed_at",
)
"""The columns of an export, in order (the CSV header)."""


def _export_row(layout: RunLayout, rec: dict[str, Any]) -> dict[str, Any]:
    row = {k: rec.get(k) for k in EXPORT_FIELDS if k != "file"}
    row["file"] = layout.relative(rec["output"]) if rec["state"] == State.DONE.value else None
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
