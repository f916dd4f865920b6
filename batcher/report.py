"""What a run leaves for people and programs: the summary, exports and ``metadata.jsonl``."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any, TextIO

from jobs import JobStore, State, Stats

from .layout import RunLayout
from .pricing import Money
from .progress import format_duration

__all__ = ["EXPORT_FIELDS", "export_records", "summary_lines", "write_metadata"]

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


def _export_row(layout: RunLayout, rec: dict[str, Any]) -> dict[str, Any]:
    row = {k: rec.get(k) for k in EXPORT_FIELDS if k != "file"}
    row["file"] = layout.relative(rec["output"]) if rec["state"] == State.DONE.value else None
    return {k: row[k] for k in EXPORT_FIELDS}


async def export_records(
    store: JobStore, layout: RunLayout, out: TextIO, *, fmt: str = "jsonl"
) -> int:
    """Write one record per job to ``out``; returns the count."""
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


async def _done_lines(store: JobStore, since: float | None = None) -> AsyncIterator[str]:
    async for rec in store.iter_records(state=State.DONE, finished_since=since):
        line = {
            "file_name": rec["output"],
            "id": rec["id"],
            "prompt": rec["prompt"],
            "seed": rec["seed"],
            "size": rec["size"],
            "width": rec["width"],
            "height": rec["height"],
            "prompt_extend": rec["prompt_extend"],
            "actual_prompt": rec["actual_prompt"] or rec["prompt"],
            "request_id": rec["request_id"] or "",
            "sha256": rec["sha256"],
            "review": rec["review"],
        }
        yield json.dumps(line, ensure_ascii=False) + "\n"


METADATA_LINES = "metadata_lines"  # meta key: lines in metadata.jsonl when last written whole


async def write_metadata(
    store: JobStore, layout: RunLayout, *, done_at_start: int, since: float | None
) -> int:
    """Bring ``images/metadata.jsonl`` up to date; returns the lines it holds.

    When the file is known to list exactly the ``done_at_start`` jobs that were done before
    this run (and ``since`` is given: no job was replaced), only the jobs finished since are
    appended: a million-line rewrite would make every stop of a big run slow. Otherwise the
    file is rewritten from the table, atomically.
    """
    layout.images.mkdir(parents=True, exist_ok=True)
    known = await store.get_meta(METADATA_LINES)
    if since is not None and layout.metadata.is_file() and known == str(done_at_start):
        n = done_at_start
        with layout.metadata.open("a", encoding="utf-8") as fh:
            async for line in _done_lines(store, since):
                fh.write(line)
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
        await store.set_meta(METADATA_LINES, str(n))
        return n
    await store.set_meta(METADATA_LINES, "")  # the file is being replaced: not to be trusted
    temp = layout.metadata.with_name(".metadata.jsonl.part")
    n = 0
    try:
        with temp.open("w", encoding="utf-8") as fh:
            async for line in _done_lines(store):
                fh.write(line)
                n += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, layout.metadata)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    await store.set_meta(METADATA_LINES, str(n))
    return n


def _money(amount: Decimal, currency: str | None) -> str:
    return str(Money(amount, currency or "USD"))


def summary_lines(
    *,
    stats: Stats,
    counters: Any,
    elapsed: float,
    reason: str,
    calls_per_second: float | None,
    rps: float,
) -> list[str]:
    """The end-of-run summary, a few lines for a person."""
    s = stats
    lines = [
        f"run {reason} after {format_duration(elapsed)}: "
        f"{s.count(State.DONE)} done, {s.count(State.FAILED)} failed, "
        f"{s.count(State.PENDING) + s.count(State.RUNNING) + s.count(State.GENERATED)} "
        f"left, of {s.total}",
        f"this run: {counters.generated} images generated, {counters.done} saved, "
        f"{counters.failed} failed, {counters.calls} API calls, {counters.retries} retries, "
        f"{counters.throttled} throttled, {counters.ambiguous} ambiguous re-sends "
        f"(may have been billed), {counters.regenerated} regenerated after URL expiry, "
        f"{counters.download_retries} download retries, cost {_money(counters.cost, s.currency)}",
    ]
    if calls_per_second is not None:
        lines.append(
            f"achieved {calls_per_second:.2f} calls/s against --rps {rps:g} "
            f"({100 * calls_per_second / rps:.0f}%)"
        )
    lines.append(
        f"all runs: {s.images_billed} images billed, cost {_money(s.cost, s.currency)}, "
        f"{s.throttled} throttled, {s.ambiguous} ambiguous, {s.regenerated} regenerated"
    )
    if s.errors_by_code:
        parts = ", ".join(f"{code} x{n}" for code, n in sorted(s.errors_by_code.items()))
        lines.append(f"failures by code: {parts}")
    return lines


def status_text(stats: Stats, layout: RunLayout) -> str:
    buf = io.StringIO()
    buf.write(f"{layout.root}: {stats.total} jobs\n")
    for state in State:
        buf.write(f"  {state.value:<10} {stats.count(state)}\n")
    buf.write(f"  images billed {stats.images_billed}, cost {_money(stats.cost, stats.currency)}\n")
    if stats.reviews:
        marks = ", ".join(f"{n} {mark}" for mark, n in sorted(stats.reviews.items()))
        buf.write(f"  reviewed: {marks}\n")
    if stats.errors_by_code:
        buf.write("  failures by code:\n")
        for code, n in sorted(stats.errors_by_code.items()):
            buf.write(f"    {code:<28} {n}\n")
    return buf.getvalue()


def status_json(stats: Stats) -> dict[str, Any]:
    out: dict[str, Any] = {"total": stats.total}
    for state in State:
        out[state.value] = stats.count(state)
    out.update(
        images_billed=stats.images_billed,
        cost=str(stats.cost),
        currency=stats.currency,
        errors_by_code=stats.errors_by_code,
        throttled=stats.throttled,
        ambiguous=stats.ambiguous,
        regenerated=stats.regenerated,
        reviews=stats.reviews,
    )
    return out
