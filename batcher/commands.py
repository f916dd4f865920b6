"""The commands behind the CLI: plan, run, status, export, retry.

Each takes parsed options and returns an exit code; user mistakes surface as exceptions the
CLI turns into one line (:mod:`batcher.cli`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from jobs import JobStore, State, Stats, open_manifest

from . import __version__
from .client import DashScopeClient, base_url_for
from .download import sweep_partials
from .errors import ConfigError
from .export import ExportOptions, check_output, run_export, write_stdout_safely
from .imagefolder import MetadataWriter
from .layout import RunLayout, RunLock
from .pool import Runner, RunOptions, RunResult, StopReason
from .pricing import Money, price_per_image
from .progress import ProgressView, Snapshot, make_view
from .report import status_json, status_text, summary_lines

__all__ = ["EXIT", "PlanOptions", "RunCommand", "cmd_export", "cmd_plan", "cmd_retry", "cmd_status"]

log = logging.getLogger("batcher")

EXIT = {
    "ok": 0,
    "failures": 1,
    "usage": 2,
    "aborted": 3,
    "stopped_early": 4,
    "interrupted": 130,
    "broken_pipe": 141,
}
EMULATOR_KEY = "sk-batcher-emulator"


def default_out(manifest: Path) -> Path:
    return Path("out") / manifest.stem


class _RedactKey(logging.Filter):
    """Defence in depth: no log record may carry the API key, whatever code wrote it."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secret and self._secret in record.getMessage():
            record.msg = record.getMessage().replace(self._secret, "***")
            record.args = None
        return True


@contextlib.contextmanager
def _file_logging(path: Path, secret: str) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactKey(secret))
    root = logging.getLogger("batcher")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _warn(msg: str) -> None:
    print(f"batcher: {msg}", file=sys.stderr)


def _manifest_identity(path: Path) -> tuple[str, str]:
    """(meta key, digest): which manifest, and what decides its rows (its bytes and this
    batcher's version)."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return f"manifest:{os.path.abspath(path)}", f"{__version__}:{digest.hexdigest()}"


async def _import(
    store: JobStore, manifest_path: Path, *, replace: bool
) -> tuple[int, int, int, int]:
    """Import new rows. A manifest unchanged since its last import is not read again: with a
    million rows that would be most of the time a resumed run takes to its first call."""
    key = digest = None
    with contextlib.suppress(OSError):  # open_manifest reports the problem, located
        key, digest = await anyio.to_thread.run_sync(_manifest_identity, manifest_path)
    if key is not None and not replace and await store.get_meta(key) == digest:
        total = await store.count()
        log.info("%s unchanged since its last import: not read again", manifest_path)
        return 0, total, 0, 0
    manifest = open_manifest(manifest_path)
    report = await store.import_rows(manifest.rows(), source=str(manifest_path), replace=replace)
    if key is not None and digest is not None:
        await store.set_meta(key, digest)
    shown = manifest.warnings[:5]
    for w in shown:
        _warn(f"warning: {w.format()}")
    if len(manifest.warnings) > len(shown):
        _warn(f"warning: ... and {len(manifest.warnings) - len(shown)} more warnings")
    return report.added, report.unchanged, report.replaced, report.updated


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanOptions:
    manifest: Path
    out: Path | None
    replace: bool = False
    region: str = "intl"
    as_json: bool = False


async def _pending_cost(store: JobStore, region: str) -> Money:
    """What generating every job still to do would cost, at the region's prices."""
    total = Money.zero(price_per_image("z-image-turbo", region, False).currency)
    for (model, extend), count in (await store.pending_by_kind()).items():
        total = total + price_per_image(model, region, extend) * count
    return total


async def _plan_figures(store: JobStore, region: str) -> tuple[Stats, Money]:
    """The counts by state and the cost of what is pending: two scans of the whole table at a
    million jobs, so they run at once, on two of the store's connections (SQLite scans without
    the GIL). The sums of ``stats`` (billed, cost, retries) are not shown: not computed."""
    found: dict[str, Any] = {}

    async def counts() -> None:
        found["stats"] = await store.stats(totals=False)

    async def pending() -> None:
        found["cost"] = await _pending_cost(store, region)

    async with anyio.create_task_group() as tg:
        tg.start_soon(counts)
        tg.start_soon(pending)
    return found["stats"], found["cost"]


async def cmd_plan(opt: PlanOptions) -> int:
    """Validate and import; no API call. Prints what a run would do."""
    layout = RunLayout(opt.out or default_out(opt.manifest))
    async with await JobStore.open(layout.db) as store:
        added, unchanged, replaced, _updated = await _import(
            store, opt.manifest, replace=opt.replace
        )
        stats, cost = await _plan_figures(store, opt.region)
    info = {
        "run_folder": str(layout.root),
        "new": added,
        "unchanged": unchanged,
        "replaced": replaced,
        "total": stats.total,
        "done": stats.count(State.DONE),
        "pending": stats.count(State.PENDING),
        "generated": stats.count(State.GENERATED),
        "failed": stats.count(State.FAILED),
        "estimated_cost": str(cost.amount),
        "currency": cost.currency,
    }
    if opt.as_json:
        print(json.dumps(info))
    else:
        print(
            f"{opt.manifest}: {added} new, {unchanged} already imported, {replaced} replaced; "
            f"{stats.total} jobs in {layout.root}\n"
            f"  done {info['done']}, pending {info['pending']}, awaiting download "
            f"{info['generated']}, failed {info['failed']}\n"
            f"  a run would generate {info['pending']} images for about {cost} "
            f"(no API call was made)"
        )
    return EXIT["ok"]


# ------------------------------------------------------------------------ status etc.


def _existing_layout(folder: Path) -> RunLayout:
    layout = RunLayout(folder)
    if not layout.db.is_file():
        raise ConfigError(f"{folder} is not a batcher run folder (no batcher.db)")
    return layout


async def cmd_status(folder: Path, *, as_json: bool) -> int:
    layout = _existing_layout(folder)
    async with await JobStore.open(layout.db, create=False) as store:
        stats = await store.stats()
    if as_json:
        print(json.dumps(status_json(stats)))
    else:
        print(status_text(stats, layout), end="")
    return EXIT["ok"]


async def cmd_export(folder: Path, opt: ExportOptions) -> int:
    """Write the run folder's jobs as records or dataset shards (see :mod:`batcher.export`).

    A closed pipe (``batcher export DIR | head -2``) ends the export quietly with exit code
    141, as a command killed by SIGPIPE would.
    """
    layout = _existing_layout(folder)
    check_output(opt)
    try:
        async with await JobStore.open(layout.db, create=False) as store:
            result = await run_export(store, layout, opt, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        write_stdout_safely(sys.stdout)
        return EXIT["broken_pipe"]
    where = f" to {opt.output}" if opt.output is not None else ""
    if result.fmt in ("parquet", "webdataset"):
        shards = len(result.files) - 1
        _warn(f"exported {result.records} records in {shards} {result.fmt} shards{where}")
    else:
        _warn(f"exported {result.records} records{where}")
    if result.missing:
        _warn(f"warning: {result.missing} done images were not found; exported without them")
    return EXIT["ok"]


async def cmd_retry(folder: Path, *, code: str | None) -> int:
    layout = _existing_layout(folder)
    with RunLock(layout.lock):
        async with await JobStore.open(layout.db, create=False) as store:
            n = await store.retry_failed(code=code)
    what = f" with error {code}" if code else ""
    print(f"{n} failed jobs{what} put back to pending; run the same command again to retry them")
    return EXIT["ok"]


# ---------------------------------------------------------------------------- run


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCommand:
    manifest: Path
    out: Path | None
    options: RunOptions
    base_url: str | None = None
    emulate: bool = False
    emulate_latency: str = "lognormal:2000:0.4"
    emulate_faults: str = ""
    emulate_rps: float = 2.0
    replace: bool = False
    progress: bool = True
    as_json: bool = False
    grace: float = 10.0


class _RateMeter:
    """Images per minute over the last minute."""

    def __init__(self) -> None:
        self._points: deque[tuple[float, int]] = deque()

    def per_minute(self, count: int) -> float:
        now = time.monotonic()
        self._points.append((now, count))
        while self._points and now - self._points[0][0] > 60:
            self._points.popleft()
        t0, c0 = self._points[0]
        return 60.0 * (count - c0) / (now - t0) if now - t0 >= 1 else 0.0


@contextlib.asynccontextmanager
async def _api_endpoint(cmd: RunCommand) -> AsyncIterator[tuple[str, str]]:
    """(base_url, api_key): the in-process emulator with --emulate, the real service else."""
    if cmd.emulate:
        from .emulator import EmulatorConfig, running_emulator

        config = EmulatorConfig(
            latency=cmd.emulate_latency, faults=cmd.emulate_faults, rps=cmd.emulate_rps
        )
        async with running_emulator(config) as emu:
            yield emu.base_url, EMULATOR_KEY
        return
    key = os.environ.get("DASHSCOPE_API_KEY", "").strip()
    if not key:
        raise ConfigError(
            "DASHSCOPE_API_KEY is not set; export your Model Studio key, "
            "or use --emulate to rehearse offline"
        )
    yield base_url_for(cmd.options.region, cmd.base_url), key


async def _watch_signals(runner: Runner, grace: float) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for _sig in signals:
            count += 1
            if count == 1:
                _warn(
                    f"stopping: finishing calls in flight (up to {grace:g}s); "
                    "press Ctrl-C again to stop at once"
                )
                runner.request_stop(StopReason.INTERRUPTED)

                async def _grace() -> None:
                    await anyio.sleep(grace)
                    runner.cancel_in_flight()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(_grace)
                    async for _again in signals:
                        runner.cancel_in_flight()
                        tg.cancel_scope.cancel()
                        break
                return


def _snapshot(runner: Runner, start: Stats, meter: _RateMeter, currency: str) -> Snapshot:
    c = runner.counters
    todo = start.total - start.count(State.DONE) - start.count(State.FAILED)
    remaining = max(0, todo - c.done - c.failed)
    per_min = meter.per_minute(c.generated)
    rate = runner.pacer.rate
    eta = remaining / rate if rate > 0 and remaining else (0.0 if not remaining else None)
    return Snapshot(
        total=start.total,
        done=start.count(State.DONE) + c.done,
        failed=start.count(State.FAILED) + c.failed,
        remaining=remaining,
        in_flight=runner.in_flight,
        retries=c.retries,
        throttled=c.throttled,
        per_minute=per_min,
        quota_per_minute=rate * 60,
        eta_seconds=eta,
        spent=str(Money(c.cost, currency)),
        elapsed=time.monotonic() - runner._t0,
        stopping=runner._reason.value if runner.stopping else None,
    )


async def _progress_loop(view: ProgressView, make: Any) -> None:
    while True:
        view.update(make())
        await anyio.sleep(0.5)


async def cmd_run(cmd: RunCommand) -> int:
    layout = RunLayout(cmd.out or default_out(cmd.manifest))
    # Fail fast on the key before touching the folder.
    if not cmd.emulate and not os.environ.get("DASHSCOPE_API_KEY", "").strip():
        raise ConfigError(
            "DASHSCOPE_API_KEY is not set; export your Model Studio key, "
            "or use --emulate to rehearse offline"
        )
    base_url_for(cmd.options.region, cmd.base_url)  # validates --region / --base-url
    layout.root.mkdir(parents=True, exist_ok=True)
    with RunLock(layout.lock):
        secret = "" if cmd.emulate else os.environ.get("DASHSCOPE_API_KEY", "").strip()
        with _file_logging(layout.log, secret):
            return await _run_locked(cmd, layout)


async def _run_locked(cmd: RunCommand, layout: RunLayout) -> int:
    currency = price_per_image("z-image-turbo", cmd.options.region, False).currency
    async with await JobStore.open(layout.db) as store:
        added, unchanged, replaced, updated = await _import(
            store, cmd.manifest, replace=cmd.replace
        )
        reclaimed = await store.reclaim(all_running=True)
        # Temporary files are left only by a run that did not end cleanly: walking a
        # million images to look for them on every start would dominate a resume.
        swept = 0
        if await store.get_meta("last_run") != "clean":
            swept = await anyio.to_thread.run_sync(sweep_partials, layout.images)
        await store.set_meta("last_run", "running")
        log.info(
            "run start: %d new jobs, %d already imported, %d replaced, %d reclaimed, "
            "%d partial files removed",
            added,
            unchanged,
            replaced,
            reclaimed,
            swept,
        )
        metadata = MetadataWriter(store, layout)
        try:
            await metadata.start(rewrite=bool(replaced or updated))
        except OSError as exc:  # a full or read-only disk: the run's own stop says why
            _metadata_problem(layout, exc)
        start = await store.stats(totals=False)  # counts only: no scan of every row's sums
        o = cmd.options
        log.info(
            "options: rps=%g concurrency=%s max_attempts=%d request_timeout=%gs region=%s "
            "endpoint=%s limit=%s budget=%s",
            o.rps,
            o.concurrency or "auto",
            o.max_attempts,
            o.request_timeout,
            o.region,
            "emulator" if cmd.emulate else (cmd.base_url or o.region),
            o.limit,
            o.budget,
        )
        if not cmd.as_json:
            _warn(
                f"{cmd.manifest}: {added} new jobs, {unchanged} already imported; "
                f"{start.count(State.DONE)} of {start.total} done; run folder {layout.root}"
            )
        view = make_view(cmd.progress)
        result: RunResult | None = None
        try:
            async with _api_endpoint(cmd) as (base_url, key):
                connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
                # No cookie jar: neither the API nor image storage uses cookies, and a jar
                # costs a lookup per request and a parse per response.
                async with aiohttp.ClientSession(
                    connector=connector, cookie_jar=aiohttp.DummyCookieJar()
                ) as session:
                    client = DashScopeClient(
                        session,
                        base_url=base_url,
                        api_key=key,
                        request_timeout=cmd.options.request_timeout,
                    )
                    runner = Runner(
                        store=store,
                        client=client,
                        session=session,
                        layout=layout,
                        options=cmd.options,
                        on_done=_appender(metadata, layout),
                    )
                    meter = _RateMeter()

                    def snap() -> Snapshot:
                        return _snapshot(runner, start, meter, currency)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_watch_signals, runner, cmd.grace)
                        if view is not None:
                            tg.start_soon(_progress_loop, view, snap)
                        result = await runner.run()
                        tg.cancel_scope.cancel()
                    if view is not None:
                        view.close(snap())
                        view = None
        finally:
            if view is not None:
                view.close()
            with anyio.CancelScope(shield=True):
                try:
                    lines = await metadata.finish()
                    log.info("metadata.jsonl: %d images", lines)
                except OSError as exc:
                    _metadata_problem(layout, exc)
        assert result is not None
        await store.set_meta("last_run", "clean")
        stats = await store.stats()
    return _finish(cmd, layout, result, stats)


def _metadata_problem(layout: RunLayout, exc: OSError) -> None:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    log.warning("could not update metadata.jsonl: %s", reason)
    _warn(f"could not update {layout.metadata}: {reason}; it is rewritten by the next run")


def _appender(metadata: MetadataWriter, layout: RunLayout) -> Any:
    """The runner's ``on_done``: append the jobs just done to ``metadata.jsonl``. A disk
    problem is said once; the images stand, and the files are rewritten at the end or by the
    next run."""
    said = False

    async def append(ids: list[str]) -> None:
        nonlocal said
        try:
            await metadata.add(ids)
        except OSError as exc:
            if not said:
                said = True
                _metadata_problem(layout, exc)

    return append


def _finish(cmd: RunCommand, layout: RunLayout, result: RunResult, stats: Stats) -> int:
    calls_per_second = None
    c = result.counters
    if result.first_call_at and result.last_call_at and c.calls > 1:
        span = result.last_call_at - result.first_call_at
        calls_per_second = (c.calls - 1) / span if span > 0 else None
    lines = summary_lines(
        stats=stats,
        counters=c,
        elapsed=result.elapsed,
        reason=result.reason.value,
        calls_per_second=calls_per_second,
        rps=cmd.options.rps,
    )
    for line in lines:
        log.info("summary: %s", line)
    left = stats.count(State.PENDING) + stats.count(State.RUNNING) + stats.count(State.GENERATED)
    if result.reason is StopReason.ABORTED:
        code = EXIT["aborted"]
    elif result.reason is StopReason.INTERRUPTED:
        code = EXIT["interrupted"]
    elif result.reason in (StopReason.BUDGET, StopReason.LIMIT) and left:
        code = EXIT["stopped_early"]
    elif stats.count(State.FAILED):
        code = EXIT["failures"]
    elif left:
        code = EXIT["stopped_early"]
    else:
        code = EXIT["ok"]
    if cmd.as_json:
        payload: dict[str, Any] = status_json(stats)
        payload.update(
            reason=result.reason.value,
            exit_code=code,
            run_folder=str(layout.root),
            images=str(layout.images),
            elapsed_seconds=round(result.elapsed, 3),
            this_run={
                "calls": c.calls,
                "generated": c.generated,
                "done": c.done,
                "failed": c.failed,
                "retries": c.retries,
                "throttled": c.throttled,
                "ambiguous": c.ambiguous,
                "regenerated": c.regenerated,
                "download_retries": c.download_retries,
                "cost": str(c.cost),
                "calls_per_second": calls_per_second,
            },
            stop_message=result.abort_message,
        )
        print(json.dumps(payload))
    for line in lines:
        _warn(line)
    if result.reason is StopReason.ABORTED:
        _warn(f"stopped: {result.abort_message}")
    elif result.reason in (StopReason.BUDGET, StopReason.LIMIT):
        _warn(f"stopped early: {result.abort_message}; run the same command again to go on")
    elif result.reason is StopReason.INTERRUPTED:
        _warn("interrupted; run the same command again to continue where it stopped")
    _warn(f"images are in {layout.images}")
    return code


def budget(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        amount = Decimal(value)
    except ArithmeticError:
        raise ConfigError(f"--budget must be an amount like 12.50, got {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ConfigError(f"--budget must be a positive amount, got {value!r}")
    return amount
