"""What the report shows, read from the job table: one record per job for the gallery, and
the run's figures (states, money per currency, failures by code, rate and latency).

Everything here is data; :mod:`batcher.gallery.site` writes it out and the page renders it
with ``textContent`` only, so no prompt, id or note is ever read as HTML.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from jobs import EMULATOR_ENDPOINT, JobStore, LaneCalls

from ..layout import RunLayout
from ..pricing import Money
from ..records import image_records
from .thumbs import thumb_name

__all__ = ["ReportData", "collect", "job_record", "summarize"]

# Fields of a job copied into the page as they are (the detail view shows each one).
_FIELDS = (
    "id",
    "state",
    "model",
    "prompt",
    "actual_prompt",
    "seed",
    "size",
    "width",
    "height",
    "prompt_extend",
    "output",
    "request_id",
    "cost",
    "currency",
    "latency_ms",
    "attempts",
    "download_attempts",
    "sha256",
    "bytes",
    "error_code",
    "error_message",
    "billed",
    "throttled",
    "ambiguous",
    "regenerated",
    "created_at",
    "started_at",
    "generated_at",
    "finished_at",
    "endpoint",
    "lane",
    "review",
    "review_note",
    "reviewed_at",
    "manifest_seed",
    "manifest_prompt",
    "n",
    "shortfall",
)
_SHOWN_IDS = 50  # job ids listed per failure code
_SHOWN_REQUESTS = 10  # request ids listed per failure code


@dataclass(kw_only=True)
class Links:
    """How the page reaches the run folder's files from where it is written."""

    images: str  # URL prefix of images/ (relative to the report folder)
    root: str  # URL prefix of the run folder

    @classmethod
    def between(cls, layout: RunLayout, out: Path) -> Links:
        def rel(target: Path) -> str:
            return PurePosixPath(os.path.relpath(target.resolve(), out.resolve())).as_posix()

        # surrogateescape: a folder name that is not UTF-8 keeps its bytes, percent-encoded
        return cls(
            images=quote(rel(layout.images), errors="surrogateescape"),
            root=quote(rel(layout.root), errors="surrogateescape"),
        )


@dataclass(kw_only=True)
class ReportData:
    """The records and the figures of one run folder."""

    records: list[dict[str, Any]] = field(default_factory=list)
    # thumb name -> (from the run folder's images/, or else its root; the image's path there)
    thumbs_wanted: dict[str, tuple[bool, str]] = field(default_factory=dict)
    quota: float | None = None
    lanes: tuple[LaneCalls, ...] = ()  # every run's calls per lane and model


def job_record(
    rec: dict[str, Any], links: Links, layout: RunLayout, history: Iterable[dict[str, Any]] = ()
) -> dict[str, Any]:
    """One job as the page sees it: its fields, its folder, the URLs of its image and
    thumbnail, and its earlier versions. A done job of several images (``n > 1``) shows its
    first image in the grid and lists every one in ``images`` (file, image and thumbnail)."""
    # fields with no value are left out (the page reads a missing one as empty): a third less
    # data to write and to parse at 20,000 jobs
    out = {k: v for k in _FIELDS if (v := rec.get(k)) is not None}
    vars_text = rec.get("vars")
    if vars_text:
        try:
            out["vars"] = json.loads(vars_text)
        except ValueError:
            out["vars"] = vars_text
    output = rec["output"]
    # string work, not pathlib: this runs once per job (20,000 jobs: pathlib took a second)
    out["folder"] = output.rpartition("/")[0]
    out["file"] = f"images/{output}"
    several = [r for r in image_records(dict(rec)) if "images" in rec]
    if rec["state"] == "done" and several:
        out["images"] = [
            {
                "index": r["image_index"],
                "file": f"images/{r['output']}",
                "image": f"{links.images}/{quote(r['output'])}",
                "thumb": f"thumbs/{thumb_name(r['sha256'])}",
                "output": r["output"],
            }
            for r in several
        ]
        out["file"] = out["images"][0]["file"]
        out["image"] = out["images"][0]["image"]
        out["thumb"] = out["images"][0]["thumb"]
    elif rec["state"] == "done" and rec.get("sha256"):
        out["image"] = f"{links.images}/{quote(output)}"
        out["thumb"] = f"thumbs/{thumb_name(rec['sha256'])}"
    versions = []
    for h in history:
        old = h["record"]
        file = h.get("file")
        sha = old.get("sha256") if file else None
        versions.append(
            {
                "reason": h.get("reason"),
                "at": h.get("replaced_at"),
                "state": old.get("state"),
                "seed": old.get("seed"),
                "prompt": old.get("prompt"),
                "actual_prompt": old.get("actual_prompt"),
                "request_id": old.get("request_id"),
                "sha256": old.get("sha256"),
                "error_code": old.get("error_code"),
                "error_message": old.get("error_message"),
                "review": old.get("review"),
                "review_note": old.get("review_note"),
                "cost": old.get("cost"),
                "currency": old.get("currency"),
                "lane": old.get("lane"),
                "file": file,
                "image": f"{links.root}/{quote(file)}" if file else None,
                "thumb": f"thumbs/{thumb_name(sha)}" if sha else None,
            }
        )
    if versions:
        out["history"] = versions
    return out


async def collect(store: JobStore, layout: RunLayout, out: Path) -> ReportData:
    """Every job and every earlier version, ready for the page; the thumbnails they need."""
    links = Links.between(layout, out)
    history: dict[str, list[dict[str, Any]]] = defaultdict(list)
    async for h in store.iter_history():
        history[h["job_id"]].append(h)
    data = ReportData()
    async for rec in store.iter_records():
        record = job_record(rec, links, layout, history.get(rec["id"], ()))
        data.records.append(record)
        for image in record.get("images", ()):
            data.thumbs_wanted[image["thumb"][len("thumbs/") :]] = (True, image["output"])
        if "thumb" in record and "images" not in record:
            data.thumbs_wanted[record["thumb"][len("thumbs/") :]] = (True, rec["output"])
        for v, h in zip(record.get("history", ()), history.get(rec["id"], ()), strict=True):
            if v["thumb"] and h.get("file"):
                data.thumbs_wanted[v["thumb"][len("thumbs/") :]] = (False, h["file"])
    data.lanes = await store.lane_calls()
    quota = await store.get_meta("rps")
    try:
        data.quota = float(quota) if quota else None
    except ValueError:
        data.quota = None
    return data


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's figures from the records: counts, money per currency and model, retries,
    review marks, failures by code (with messages, request ids and job ids)."""
    states: Counter[str] = Counter()
    reviews: Counter[str] = Counter()
    # (currency, emulated, model): what the emulator "cost" is never added to real spend
    money: dict[tuple[str, bool, str], Decimal] = defaultdict(Decimal)
    totals = Counter[str]()
    failures: dict[str, dict[str, Any]] = {}
    for r in records:
        states[r["state"]] += 1
        if r.get("review"):
            reviews[r["review"]] += 1
        emulated = r.get("endpoint") == EMULATOR_ENDPOINT
        for key in ("throttled", "ambiguous", "regenerated", "attempts"):
            totals[key] += int(r.get(key) or 0)
        totals["emulated" if emulated else "billed"] += int(r.get("billed") or 0)
        cost = Decimal(r.get("cost") or "0")
        if cost and r.get("currency"):
            money[(r["currency"], emulated, r["model"])] += cost
        if r["state"] == "failed":
            code = r.get("error_code") or "unknown"
            f = failures.setdefault(
                code,
                {"code": code, "count": 0, "messages": Counter(), "request_ids": [], "ids": []},
            )
            f["count"] += 1
            if r.get("error_message"):
                f["messages"][r["error_message"]] += 1
            if r.get("request_id") and len(f["request_ids"]) < _SHOWN_REQUESTS:
                f["request_ids"].append(r["request_id"])
            if len(f["ids"]) < _SHOWN_IDS:
                f["ids"].append(r["id"])
    per_currency: dict[tuple[str, bool], Decimal] = defaultdict(Decimal)
    for (currency, emulated, _model), amount in money.items():
        per_currency[(currency, emulated)] += amount
    return {
        "total": len(records),
        "states": dict(states),
        "reviews": dict(reviews),
        "totals": dict(totals),
        # never one sum across currencies: one line per currency, and per model within it
        "cost": [
            {
                "currency": cur,
                "emulated": emulated,
                "amount": str(amount),
                "text": str(Money(amount, cur)) + (" emulated, not billed" if emulated else ""),
                "models": [
                    {"model": m, "text": str(Money(a, c))}
                    for (c, e, m), a in sorted(money.items())
                    if (c, e) == (cur, emulated)
                ],
            }
            for (cur, emulated), amount in sorted(per_currency.items())
        ],
        "failures": [
            {
                "code": f["code"],
                "count": f["count"],
                "messages": [m for m, _ in f["messages"].most_common(3)],
                "request_ids": f["request_ids"],
                "ids": f["ids"],
            }
            for f in sorted(failures.values(), key=lambda f: (-f["count"], f["code"]))
        ],
    }
