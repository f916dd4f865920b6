"""``batcher report``: the static report folder, written from the job table.

::

    report/
      index.html          the page: the run's figures, two charts, failures, the gallery
      assets/             the page's script and style sheet (no CDN: nothing is fetched)
      data/summary.js     the run's figures
      data/jobs-000.js    the jobs, 5,000 per file, as ``<script>`` files: a page opened from
                          ``file://`` may load scripts but not fetch JSON
      thumbs/ab/<sha256>.jpg   one thumbnail per image, made once (see ``thumbs``)

The page links the full images where they are in the run folder (``../images/...`` for the
default place), so zipping the run folder keeps everything; the report folder alone still
browses with its thumbnails. Each file is written to a temporary name and renamed, the page
last, so a report being rewritten is never seen half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

import anyio

from jobs import JobStore, State, StoreUnreachable

from ..errors import ConfigError
from ..layout import RunLayout
from ..summary import lanes_json
from .charts import latency_histogram, rate_chart
from .data import ReportData, collect, summarize
from .thumbs import ThumbJob, existing_thumbs, make_thumbs, thumb_name

__all__ = [
    "ReportResult",
    "build_report",
    "check_output",
    "cmd_report",
    "follow_thumbnails",
]

CHUNK = 5000  # jobs per data file
# What a report folder holds (thumbs/ may come first: a run makes thumbnails as it goes).
_REPORT_ENTRIES = frozenset({"index.html", "assets", "data", "thumbs"})
ASSETS = ("app.js", "style.css")


@dataclass(frozen=True, kw_only=True, slots=True)
class ReportResult:
    """What a report build wrote."""

    index: Path
    jobs: int
    thumbs_made: int
    thumbs_missing: int  # left for the next build (a deadline passed, or unreadable images)
    seconds: float


def _ours(name: str) -> bool:
    """An entry a report folder holds: its files, or a temporary one of a build."""
    return name in _REPORT_ENTRIES or (name.startswith(".") and name.endswith(".part"))


def _write(path: Path, text: str) -> None:
    """Write ``path`` under a temporary name of this process's own, then rename it: workers
    sharing one run folder may each write the report as they finish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _js(payload: Any) -> str:
    """JSON as a script's argument. ``</`` cannot end a script loaded by ``src``, but it is
    escaped anyway, with the two line separators older parsers reject in strings."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return text.replace("</", "<\\/").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _figures_html(summary: dict[str, Any]) -> str:
    totals = summary["totals"]
    spend = (
        "".join(
            f"<tr><th>{escape(c['text'])}</th><td>"
            + ", ".join(escape(f"{m['model']} {m['text']}") for m in c["models"])
            + "</td></tr>"
            for c in summary["cost"]
        )
        or "<tr><td>nothing billed yet</td></tr>"
    )
    retries = "".join(
        f"<tr><th>{escape(label)}</th><td>{int(totals.get(key, 0)):,}</td></tr>"
        for key, label in (
            ("billed", "images billed"),
            ("emulated", "images from the emulator (not billed)"),
            ("attempts", "generation attempts"),
            ("throttled", "throttled (429)"),
            ("ambiguous", "ambiguous re-sends"),
            ("regenerated", "regenerated after URL expiry"),
        )
    )
    return (
        '<div class="card"><h2>Jobs</h2><table id="state-counts"></table></div>'
        f'<div class="card"><h2>Spend</h2><table id="spend">{spend}</table>'
        '<p class="muted">per currency, never summed across currencies</p></div>'
        f'<div class="card"><h2>Calls</h2><table id="calls">{retries}</table></div>'
        '<div class="card"><h2>Review</h2><table id="review-counts"></table></div>'
        + _lanes_html(summary.get("lanes", {}))
    )


def _lanes_html(lanes: dict[str, Any]) -> str:
    """The lanes card (several keys): per lane its calls, the rate achieved against its quota
    per model, throttled answers and cost per currency. Nothing for a run of one key."""
    if len(lanes) < 2 and set(lanes) <= {"default"}:
        return ""
    rows = []
    for name, lane in lanes.items():
        rates = []
        for model, m in lane["models"].items():
            rate = m["calls_per_second"]
            quota = m["quota"]
            shown = "n/a" if rate is None else f"{rate:.2f}/s"
            rates.append(f"{model} {shown}" + (f" of {quota:g}/s" if quota else ""))
        money = [f"{a} {c}" for c, a in lane["spent"].items()]
        money += [f"{a} {c} emulated" for c, a in lane["emulated"].items()]
        rows.append(
            f"<tr><th>{escape(name)}</th><td>{lane['calls']:,}</td>"
            f"<td>{escape(', '.join(rates))}</td><td>{lane['throttled']:,}</td>"
            f"<td>{escape(', '.join(money) or 'nothing')}</td></tr>"
        )
    return (
        '<div class="card"><h2>Lanes</h2><table id="lanes"><thead><tr><th>lane</th>'
        "<th>calls</th><th>rate (quota)</th><th>throttled</th><th>cost</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<p class="muted">each key paced on its own, over all runs</p></div>'
    )


def _failures_html(summary: dict[str, Any]) -> str:
    if not summary["failures"]:
        return '<p class="muted" id="no-failures">No failed jobs.</p>'
    rows = []
    for f in summary["failures"]:
        more = f["count"] - len(f["ids"])
        ids = ", ".join(escape(i) for i in f["ids"]) + (f" … and {more:,} more" if more else "")
        rows.append(
            f'<tr data-code="{escape(f["code"], quote=True)}">'
            f'<td><button type="button" class="link code-filter" '
            f'data-code="{escape(f["code"], quote=True)}">{escape(f["code"])}</button></td>'
            f"<td>{f['count']:,}</td>"
            f"<td>{'<br>'.join(escape(m) for m in f['messages'])}</td>"
            f'<td class="mono">{"<br>".join(escape(r) for r in f["request_ids"])}</td>'
            f'<td class="ids">{ids}</td></tr>'
        )
    return (
        '<table id="failures-table"><thead><tr><th>code</th><th>jobs</th><th>message</th>'
        "<th>request_id</th><th>job ids</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def _page(layout: RunLayout, data: ReportData, summary: dict[str, Any], chunks: int) -> str:
    latencies = [r["latency_ms"] for r in data.records if r.get("latency_ms") is not None]
    times = [float(r["generated_at"]) for r in data.records if r.get("generated_at")]
    charts = rate_chart(times, quota=data.quota) + latency_histogram(latencies)
    # a folder name that is not UTF-8 (bytes kept as surrogates) is shown with replacements
    raw = layout.root.resolve().name.encode("utf-8", "surrogateescape")
    name = escape(raw.decode("utf-8", "replace"))
    written = escape(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    scripts = "".join(f'<script src="data/jobs-{i:03d}.js"></script>' for i in range(chunks))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>batcher report: {name}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="assets/style.css">
</head>
<body>
<header>
  <h1>Run report <span id="run-name">{name}</span></h1>
  <p class="muted">written {written} · {summary["total"]:,} jobs ·
    <span id="mode">static report</span></p>
</header>
<main>
<section id="overview">
  <div class="cards">{_figures_html(summary)}</div>
  <div class="charts">{charts}</div>
  <h2>Failures by code</h2>
  {_failures_html(summary)}
</section>
<section id="gallery">
  <h2>Gallery</h2>
  <form id="filters" autocomplete="off">
    <label>state <select id="f-state"></select></label>
    <label>folder <select id="f-folder"></select></label>
    <label>model <select id="f-model"></select></label>
    <label>failure <select id="f-code"></select></label>
    <label>review <select id="f-review"></select></label>
    <label class="grow">search <input id="f-search" type="search"
      placeholder="prompt or id  ( / )"></label>
  </form>
  <nav class="pager" id="pager-top"></nav>
  <div id="grid" role="list"></div>
  <nav class="pager" id="pager-bottom"></nav>
  <p class="muted keys">Keys: <kbd>j</kbd>/<kbd>→</kbd> next, <kbd>k</kbd>/<kbd>←</kbd>
    previous, <kbd>Enter</kbd> open, <kbd>Esc</kbd> close, <kbd>/</kbd> search<span
    class="review-only">, <kbd>a</kbd> approve, <kbd>r</kbd> reject, <kbd>u</kbd> unmark,
    <kbd>n</kbd> note</span>.</p>
</section>
</main>
<div id="detail" hidden>
  <div class="detail-box" role="dialog" aria-modal="true" aria-labelledby="d-title">
    <div class="detail-head">
      <h2 id="d-title"></h2>
      <span id="d-pos" class="muted"></span>
      <span id="d-mark" class="badge"></span>
      <span class="spacer"></span>
      <span class="review-only">
        <button type="button" id="d-approve">Approve (a)</button>
        <button type="button" id="d-reject">Reject (r)</button>
        <button type="button" id="d-unmark">Unmark (u)</button>
      </span>
      <button type="button" id="d-prev">← Prev</button>
      <button type="button" id="d-next">Next →</button>
      <button type="button" id="d-close">Close (Esc)</button>
    </div>
    <div class="detail-body">
      <div class="detail-image"><img id="d-img" alt=""><p id="d-img-note" class="muted"></p>
        <div id="d-images" hidden></div></div>
      <div class="detail-fields">
        <div class="review-only note-box">
          <label for="d-note">note</label>
          <textarea id="d-note" rows="2"></textarea>
          <button type="button" id="d-note-save">Save note</button>
          <span id="d-status" class="muted"></span>
        </div>
        <table id="d-fields"></table>
        <h3>Earlier versions</h3>
        <div id="d-history"></div>
      </div>
    </div>
  </div>
</div>
<script src="assets/app.js"></script>
<script src="data/summary.js"></script>
{scripts}
</body>
</html>
"""


async def build_report(
    store: JobStore,
    layout: RunLayout,
    out: Path | None = None,
    *,
    thumb_seconds: float | None = None,
    processes: int | None = None,
) -> ReportResult:
    """Write (or refresh) the report of ``layout``'s run into ``out`` (default
    ``DIR/report``). Only thumbnails not made before are made; with ``thumb_seconds``, no
    new batch of them starts after that long (the page shows the full image for the rest)."""
    started = time.monotonic()
    out = out or layout.report
    data = await collect(store, layout, out)
    summary = summarize(data.records)
    summary["quota"] = data.quota
    summary["lanes"] = lanes_json(data.lanes)
    thumbs = out / "thumbs"

    def write_all() -> tuple[int, int]:
        have = existing_thumbs(thumbs)
        wanted = [
            ThumbJob((layout.images if in_images else layout.root) / rel, thumbs / name)
            for name, (in_images, rel) in data.thumbs_wanted.items()
            if name not in have
        ]
        deadline = None if thumb_seconds is None else started + thumb_seconds
        made = make_thumbs(wanted, processes=processes, deadline=deadline)
        for name in ASSETS:
            text = resources.files(__package__).joinpath("static", name).read_text("utf-8")
            _write(out / "assets" / name, text)
        records = data.records
        chunks = max(1, (len(records) + CHUNK - 1) // CHUNK)
        for i in range(chunks):
            part = records[i * CHUNK : (i + 1) * CHUNK]
            _write(out / "data" / f"jobs-{i:03d}.js", f"BATCHER.add({_js(part)});\n")
        for stale in (out / "data").glob("jobs-*.js"):
            if stale.name >= f"jobs-{chunks:03d}.js":
                stale.unlink()
        _write(out / "data" / "summary.js", f"BATCHER.setSummary({_js(summary)});\n")
        _write(out / "index.html", _page(layout, data, summary, chunks))
        return made, len(wanted) - made

    made, missing = await anyio.to_thread.run_sync(write_all)
    return ReportResult(
        index=out / "index.html",
        jobs=len(data.records),
        thumbs_made=made,
        thumbs_missing=missing,
        seconds=time.monotonic() - started,
    )


FOLLOW_SECONDS = 10.0  # how often a run makes the thumbnails of the images it finished
FOLLOW_MAX_JOBS = 200_000  # beyond this a run leaves the thumbnails to `batcher report`
FOLLOW_BATCH = 200  # thumbnails a round at most; the report at the end makes any left


async def follow_thumbnails(
    store: JobStore, layout: RunLayout, *, every: float = FOLLOW_SECONDS
) -> None:
    """While a run goes, make the thumbnails of the images it finished, a few at a time on a
    worker thread, so the report at the end (or ``batcher review`` meanwhile) has little left
    to do. Runs until cancelled; a thumbnail that cannot be made is left for the report."""
    if await store.count() > FOLLOW_MAX_JOBS:
        return
    thumbs = layout.report / "thumbs"
    since = store.clock()
    while True:
        await anyio.sleep(every)
        now = store.clock()
        wanted = []
        try:
            async for rec in store.iter_records(state=State.DONE, finished_since=since - 1.0):
                if rec["sha256"]:
                    dest = thumbs / thumb_name(rec["sha256"])
                    wanted.append(ThumbJob(layout.images / rec["output"], dest))
        except StoreUnreachable:
            continue  # the database went away: the run waits for it; so does this, from `since`
        since = now
        if wanted:  # at most a few seconds of work a round: the run's end waits for it
            await anyio.to_thread.run_sync(_make_missing, wanted[:FOLLOW_BATCH])


def _make_missing(wanted: list[ThumbJob]) -> None:
    with contextlib.suppress(OSError):
        make_thumbs([j for j in wanted if not j.dest.exists()], processes=1)


def check_output(out: Path) -> None:
    """Refuse to write a report into a folder that holds something else (one line)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not _ours(p.name)]
        if foreign and not (out / "index.html").is_file():
            raise ConfigError(
                f"{out} is not empty and holds no report (it has {foreign[0]!r}); "
                "choose another -o folder"
            )


async def cmd_report(folder: Path, *, output: Path | None, database: str | None = None) -> int:
    """``batcher report DIR [-o PATH] [--db URL]``: write the report, print where it is."""
    layout = RunLayout.locate(folder, database)
    if not layout.has_store():
        raise layout.no_store()
    out = output or layout.report
    check_output(out)
    async with await JobStore.open(layout.store, create=False) as store:
        result = await build_report(store, layout, out)
    print(
        f"report of {result.jobs:,} jobs written in {result.seconds:.1f}s "
        f"({result.thumbs_made:,} new thumbnails): {result.index}",
        file=sys.stderr,
    )
    print(result.index.resolve().as_uri())
    return 0
