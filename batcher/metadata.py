"""The durable ``images/metadata.jsonl``: one line per done image, beside the images.

The file follows the Hugging Face ``imagefolder`` layout (``file_name`` relative to
``images/``), so ``load_dataset("imagefolder", data_dir=...)`` reads the folder as it is. It is
brought up to date at the end of every run, even an interrupted one.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from jobs import JobStore, State

from .layout import RunLayout

__all__ = ["METADATA_LINES", "actual_prompt", "write_metadata"]

METADATA_LINES = "metadata_lines"
"""Meta key: the lines ``metadata.jsonl`` held when it was last written whole ("" while it is
being replaced, so a crash meanwhile makes the next run rewrite it)."""


def actual_prompt(rec: dict[str, Any]) -> str | None:
    """The prompt the image was generated from: the service's rewrite with ``prompt_extend``,
    the job's own prompt otherwise; None for a job not generated yet. ``metadata.jsonl`` and
    ``batcher export`` both say this, so they agree."""
    if rec.get("generated_at") is None and rec.get("request_id") is None:
        return None
    return rec.get("actual_prompt") or rec.get("prompt")


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
            "actual_prompt": actual_prompt(rec),
            "request_id": rec["request_id"] or "",
            "sha256": rec["sha256"],
        }
        yield json.dumps(line, ensure_ascii=False) + "\n"


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
