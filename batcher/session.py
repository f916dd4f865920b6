"""A run's set-up and tear-down, around :class:`batcher.pool.Runner`.

``batcher run`` is :func:`execute_run`: read the lanes (``--lanes``, else the one ``default``
lane of ``DASHSCOPE_API_KEY``) and their keys, take the run folder's lock, log to ``batcher.log``
(the keys filtered out), import the manifest, reclaim jobs a dead process held, sweep its
temporary files, start the endpoint (the in-process emulator with ``--emulate``) and the HTTP
session, watch Ctrl-C / SIGTERM, show progress, run, and at the end, whatever happened, bring
``metadata.jsonl`` up to date. What to print and which exit code follow from the
:class:`RunOutcome` it returns (:mod:`batcher.summary`, :mod:`batcher.exitcodes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import aiohttp
import anyio

from jobs import JobStore, State, Stats, StoreUnavailable

from .client import DashScopeClient, base_url_for
from .download import sweep_partials
from .errors import ConfigError
from .folder import Target, check_folder_endpoint, endpoint_label, resolve_target
from .gallery.site import build_report, check_output, follow_thumbnails
from .importing import ImportSummary, import_manifest
from .lanebook import RunLane
from .lanes import Lane, default_lane, lane_keys, load_lanes, rehearsal_keys
from .layout import RunLayout, RunLock
from .metadata import MetadataWriter
from .pool import RunCounters, Runner, RunOptions, RunResult, StopReason
from .pricing import Money, currency_of, price_per_image
from .progress import ProgressView, Snapshot, Throughput, make_view
from .sendlog import SendLog, lost_answers
from .wording import plural

__all__ = ["EMULATOR_KEY", "RunCommand", "RunOutcome", "execute_run"]

log = logging.getLogger("batcher")

EMULATOR_KEY = "sk-batcher-emulator"
"""The key the in-process emulator of ``--emulate`` accepts (not a secret)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCommand:
    """Everything ``batcher run`` was asked to do. ``manifest`` may be a run folder (it names
    its own manifest); ``budget_currency`` is the currency ``--budget`` named, if any."""

    manifest: Path
    out: Path | None
    options: RunOptions
    budget_currency: str | None = None
    base_url: str | None = None
    emulate: bool = False
    emulate_latency: str = "lognormal:2000:0.4"
    emulate_faults: str = ""
    emulate_rps: float | None = None  # None: the emulator's own per-model quotas
    replace: bool = False
    progress: bool = True
    as_json: bool = False
    grace: float = 10.0
    database: str | None = None  # a postgresql:// URL: the run's table is shared there
    lanes: Path | None = None  # a lanes file (--lanes): several keys, each paced on its own


@dataclass(frozen=True, kw_only=True, slots=True)
class RunOutcome:
    """How a run ended (``result``) and the folder's table after it (``stats``)."""

    layout: RunLayout
    imported: ImportSummary
    result: RunResult
    stats: Stats
    report: Path | None = None  # the report's index.html, refreshed at the end of the run


def _warn(msg: str) -> None:
    print(f"batcher: {msg}", file=sys.stderr)


def _api_key() -> str:
    key = os.environ.get("DASHSCOPE_API_KEY", "").strip()
    if not key:
        raise ConfigError(
            "DASHSCOPE_API_KEY is not set; export your Model Studio key, "
            "or use --emulate to rehearse offline"
        )
    return key


class _RedactKey(logging.Filter):
    """Defence in depth: no log record may carry an API key, whatever code wrote it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(s in message for s in self._secrets):
            for secret in self._secrets:
                message = message.replace(secret, "***")
            record.msg = message
            record.args = None
        return True


@dataclass(frozen=True, kw_only=True, slots=True)
class _Lanes:
    """The run's lanes with their keys (never written anywhere) and base URLs."""

    lanes: list[Lane]
    keys: dict[str, str]
    from_file: bool

    def base_url(self, lane: Lane) -> str:
        return base_url_for(lane.region, lane.base_url)


def _lanes(cmd: RunCommand) -> _Lanes:
    """The lanes of ``--lanes`` (a bad file is one located line), else the ``default`` lane;
    their keys from the environment (a rehearsal makes its own: see :mod:`batcher.lanes`)."""
    if cmd.lanes is None:
        lane = default_lane(cmd.options.region, cmd.base_url)
        key = "" if cmd.emulate else _api_key()
        return _Lanes(lanes=[lane], keys={lane.name: key}, from_file=False)
    if cmd.base_url is not None:
        raise ConfigError("--base-url and --lanes: give each lane its base_url in the lanes file")
    lanes = load_lanes(cmd.lanes)
    keys = rehearsal_keys(lanes) if cmd.emulate else lane_keys(lanes)
    return _Lanes(lanes=lanes, keys=keys, from_file=True)


@contextlib.contextmanager
def _file_logging(path: Path, secret: list[str]) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # backslashreplace: a file name that is not UTF-8 is logged escaped, not an error
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
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


async def execute_run(cmd: RunCommand) -> RunOutcome:
    """Set up a run folder, run every job that is due, tear down; see the module docstring.

    Raises :class:`ConfigError` (no key, a bad ``--base-url``) before the folder is touched.
    """
    lanes = _lanes(cmd)  # fail fast on the lanes file and the keys
    if lanes.from_file:  # the run's prices and --budget follow the lanes' region
        options = dataclasses.replace(cmd.options, region=lanes.lanes[0].region)
        cmd = dataclasses.replace(cmd, options=options)
    base_url = base_url_for(cmd.options.region, cmd.base_url)  # validates --region / --base-url
    for lane in lanes.lanes:
        lanes.base_url(lane)
    _check_budget_currency(cmd, lanes.lanes)
    target = await resolve_target(cmd.manifest, cmd.out, emulate=cmd.emulate, database=cmd.database)
    layout = target.layout
    layout.check_database()
    endpoint = endpoint_label(emulate=cmd.emulate, base_url=base_url)
    siblings = frozenset(
        endpoint_label(emulate=cmd.emulate, base_url=lanes.base_url(lane)) for lane in lanes.lanes
    )
    with contextlib.ExitStack() as held:
        try:
            layout.root.mkdir(parents=True, exist_ok=True)
            # On a shared table other workers use the folder too: no folder lock (their
            # leases fence them; see jobs.store).
            if not layout.shared:
                held.enter_context(RunLock(layout.lock))
            held.enter_context(_file_logging(layout.log, list(lanes.keys.values())))
        except OSError as exc:  # a read-only folder or medium, a file in the way, ...
            raise ConfigError(
                f"cannot write the run folder {layout.root}: {exc.strerror or exc}; "
                "choose a writable folder with --out"
            ) from exc
        async with await JobStore.open(layout.store, stage=True) as store:
            layout.remember_database()
            await check_folder_endpoint(
                store, endpoint, layout.root, default=target.in_paid_default, siblings=siblings
            )
            imported, lost = await _prepare(store, cmd, target)
            await _check_lanes_serve(store, lanes)
            spent = await _budget_spent(store, cmd)
            metadata = MetadataWriter(store, layout)
            try:
                await metadata.start()
            except OSError as exc:  # a full or read-only disk: the run's own stop says why
                _metadata_problem(layout, exc)
            start = await store.stats(totals=False)  # counts only: no scan of every row's sums
            if not cmd.as_json:
                withdrawn = start.count(State.WITHDRAWN)
                _warn(
                    f"{target.manifest}: {plural(imported.added, 'new job')}, "
                    f"{imported.unchanged_of(start)} already imported"
                    f"{f', {imported.replaced} replaced' if imported.replaced else ''}"
                    f"{f', {imported.moved} moved' if imported.moved else ''}"
                    f"{f', {withdrawn} withdrawn' if withdrawn else ''}; "
                    f"{start.count(State.DONE)} of {start.total - withdrawn} done; "
                    f"run folder {layout.root}"
                )
            try:
                on_done = _appender(metadata, layout)
                result = await _drive(cmd, store, layout, start, lanes, spent, on_done, lost)
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        lines = await metadata.finish()
                        log.info("metadata.jsonl: %d images", lines)
                    except OSError as exc:
                        _metadata_problem(layout, exc)
                    except StoreUnavailable as exc:  # the database went away: said below
                        log.warning("metadata.jsonl not brought up to date: %s", exc)
            if result.reason is StopReason.DATABASE:  # one line, exit 3 (see batcher.cli)
                raise StoreUnavailable(result.abort_message)
            await store.set_meta("last_run", "clean")
            stats = await store.stats()
            report = await _write_report(store, layout, result)
    return RunOutcome(layout=layout, imported=imported, result=result, stats=stats, report=report)


async def _write_report(store: JobStore, layout: RunLayout, result: RunResult) -> Path | None:
    """Refresh the run folder's report (only new thumbnails are made, within a time budget;
    the page shows the full image for the rest). A report that cannot be written is a warning,
    never the run's failure."""
    quick = result.reason in (StopReason.INTERRUPTED, StopReason.ABORTED)
    try:
        check_output(layout.report)
        done = await build_report(store, layout, thumb_seconds=3.0 if quick else 60.0)
    except (OSError, ValueError, ConfigError) as exc:
        reason = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc)
        log.warning("could not write the report: %s", reason)
        _warn(f"could not write the report in {layout.report}: {reason}")
        return None
    log.info("report: %d jobs, %d new thumbnails, %.1fs", done.jobs, done.thumbs_made, done.seconds)
    return done.index


async def _check_lanes_serve(store: JobStore, lanes: _Lanes) -> None:
    """Refuse, before any call, a lanes file that leaves a model of the jobs to do without a
    lane serving it."""
    if not lanes.from_file:
        return
    for model, _extend in await store.pending_by_kind():
        if not any(lane.serves(model) for lane in lanes.lanes):
            raise ConfigError(
                f"no lane serves {model}, which jobs to do use: add it to a lane's models "
                "(or leave models out to serve every model)"
            )


def _check_budget_currency(cmd: RunCommand, lanes: list[Lane]) -> None:
    currencies = {currency_of(lane.region) for lane in lanes}
    if cmd.options.budget is not None and len(currencies) > 1:
        raise ConfigError(
            "--budget with lanes priced in several currencies "
            f"({', '.join(sorted(currencies))}): a budget is in one currency; run each "
            "region's lanes on their own, or leave --budget out"
        )
    currency = currency_of(cmd.options.region)
    if cmd.budget_currency is not None and cmd.budget_currency != currency:
        raise ConfigError(
            f"--budget is in {cmd.budget_currency}, but --region {cmd.options.region} is "
            f"priced in {currency}: give the budget in {currency}"
        )


async def _budget_spent(store: JobStore, cmd: RunCommand) -> Decimal:
    """What the folder spent already in the region's currency (emulated money for a
    rehearsal): ``--budget`` is for the folder, not per command. A budget below the price of
    one image of what is left to do refuses before any call."""
    budget = cmd.options.budget
    if budget is None:
        return Decimal(0)
    currency = currency_of(cmd.options.region)
    kinds = await store.pending_by_kind()
    if kinds:
        cheapest = min(price_per_image(m, cmd.options.region, e) for m, e in kinds)
        if budget < cheapest.amount:
            raise ConfigError(
                f"--budget {Money(budget, currency)} is less than one image costs "
                f"({cheapest}): nothing could be generated"
            )
    return sum(
        (
            s.amount
            for s in await store.spend()
            if s.currency == currency and s.emulated == cmd.emulate
        ),
        Decimal(0),
    )


async def _prepare(store: JobStore, cmd: RunCommand, target: Target) -> tuple[ImportSummary, int]:
    """Import, reclaim what a dead process held, sweep its temporary files, log the options.
    Returns the import and how many of the dead process's calls lost their answer (this run
    sends them again: ambiguous re-sends)."""
    layout = target.layout
    imported = await import_manifest(store, target, replace=cmd.replace)
    # Holding the folder's lock, no live process can own a running job; on a shared table
    # other workers may, so only expired leases are taken back. First, the calls a killed
    # run sent and never had answered count as perhaps billed (see batcher.sendlog).
    lost = 0
    if not store.shared:
        lost = await store.note_lost_answers(lost_answers(layout.sent_calls))
    reclaimed = await store.reclaim(all_running=not store.shared)
    # Temporary files are left only by a run that did not end cleanly: walking a million
    # images to look for them on every start would dominate a resume. On a shared table a
    # live worker's downloads are in flight: only when a dead worker's jobs were taken back
    # are the files nobody has written for two leases swept (a live worker renames its own
    # within seconds, and one stalled that long has lost its jobs anyway).
    swept = 0
    if not store.shared and await store.get_meta("last_run") != "clean":
        swept = await anyio.to_thread.run_sync(sweep_partials, layout.images)
    elif store.shared and reclaimed:
        stale = functools.partial(
            sweep_partials, layout.images, older_than=2 * cmd.options.lease_seconds
        )
        swept = await anyio.to_thread.run_sync(stale)
    await store.set_meta("last_run", "running")
    await store.set_meta("rps", repr(float(cmd.options.rps)))  # the report's quota line
    log.info(
        "run start: %d new jobs, %d already imported, %d replaced, %d withdrawn, %d moved, "
        "%d reclaimed (%d with a call sent and its answer lost: perhaps billed), "
        "%d partial files removed",
        imported.added,
        imported.unchanged,
        imported.replaced,
        imported.withdrawn,
        imported.moved,
        reclaimed,
        lost,
        swept,
    )
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
    return imported, lost


@contextlib.asynccontextmanager
async def _api_endpoint(
    cmd: RunCommand, lanes: _Lanes
) -> AsyncIterator[list[tuple[Lane, str, str]]]:
    """(lane, base_url, api_key) of every lane: the in-process emulator with --emulate (each
    lane of a lanes file its own emulated account, at the lane's quota), the real service
    else."""
    if cmd.emulate:
        from .emulator import EmulatorConfig, running_emulator

        config = EmulatorConfig(latency=cmd.emulate_latency, faults=cmd.emulate_faults)
        if cmd.emulate_rps is not None:  # --rps R with --emulate rehearses an R/s quota
            config = dataclasses.replace(config, rps=cmd.emulate_rps)
        if lanes.from_file:
            accounts, rates = _rehearsal_accounts(lanes)
            config = dataclasses.replace(config, accounts=accounts, account_rps=rates)
        async with running_emulator(config) as emu:
            keys = lanes.keys if lanes.from_file else {lanes.lanes[0].name: EMULATOR_KEY}
            yield [(lane, emu.base_url, keys[lane.name]) for lane in lanes.lanes]
        return
    yield [(lane, lanes.base_url(lane), lanes.keys[lane.name]) for lane in lanes.lanes]


def _rehearsal_accounts(
    lanes: _Lanes,
) -> tuple[dict[str, tuple[str, ...]], dict[str, dict[str, float]]]:
    """The emulator's accounts for a rehearsal of a lanes file: one per key (lanes naming the
    same variable share it, as on the service), each at its first lane's quota per model."""
    from .models import MODELS

    accounts: dict[str, tuple[str, ...]] = {}
    rates: dict[str, dict[str, float]] = {}
    for lane in lanes.lanes:
        account = f"lane-{lane.key_env.lower()}"
        if account in accounts:
            continue
        accounts[account] = (lanes.keys[lane.name],)
        rates[account] = {
            model: lane.rate_for(model, entry.quota.rps)
            for model, entry in MODELS.items()
            if lane.serves(model)
        }
    return accounts, rates


async def _drive(
    cmd: RunCommand,
    store: JobStore,
    layout: RunLayout,
    start: Stats,
    lanes: _Lanes,
    spent: Decimal,
    on_done: Callable[[list[str]], Awaitable[None]],
    lost: int = 0,
) -> RunResult:
    """The endpoint, the HTTP session, the runner, the signal watcher and the progress view;
    ``on_done`` hears the ids of the jobs the runner completes; ``lost`` calls of a killed run
    lost their answer, and this run sends them again (counted as ambiguous re-sends)."""
    currency = currency_of(cmd.options.region)
    view = make_view(cmd.progress)
    try:
        async with _api_endpoint(cmd, lanes) as endpoints:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
            # No cookie jar: neither the API nor image storage uses cookies, and a jar
            # costs a lookup per request and a parse per response.
            async with aiohttp.ClientSession(
                connector=connector, cookie_jar=aiohttp.DummyCookieJar()
            ) as session:
                run_lanes = [
                    RunLane(
                        lane=lane,
                        client=DashScopeClient(
                            session,
                            base_url=base_url,
                            api_key=key,
                            request_timeout=cmd.options.request_timeout,
                        ),
                        endpoint=endpoint_label(emulate=cmd.emulate, base_url=base_url),
                    )
                    for lane, base_url, key in endpoints
                ]
                runner = Runner(
                    sent_calls=None if layout.shared else SendLog(layout.sent_calls),
                    store=store,
                    client=run_lanes[0].client,
                    session=session,
                    layout=layout,
                    options=cmd.options,
                    endpoint=run_lanes[0].endpoint,
                    spent=spent,
                    on_done=on_done,
                    lanes=run_lanes,
                    on_notice=_warn,
                )
                runner.counters.ambiguous += lost
                meter = _RateMeter()
                pace = Throughput()

                def snap() -> Snapshot:
                    return _snapshot(runner, start, meter, pace, currency, emulated=cmd.emulate)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(_watch_signals, runner, cmd.grace)
                    if view is not None:
                        tg.start_soon(_progress_loop, view, snap)
                    tg.start_soon(follow_thumbnails, store, layout)
                    result = await runner.run()
                    tg.cancel_scope.cancel()
                if view is not None:
                    view.close(snap())
                    view = None
                return result
    finally:
        if view is not None:
            view.close()


def _metadata_problem(layout: RunLayout, exc: OSError) -> None:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    log.warning("could not update metadata.jsonl: %s", reason)
    _warn(f"could not update {layout.metadata}: {reason}; it is rewritten by the next run")


def _appender(
    metadata: MetadataWriter, layout: RunLayout
) -> Callable[[list[str]], Awaitable[None]]:
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


async def _watch_signals(runner: Runner, grace: float) -> None:
    """First Ctrl-C / SIGTERM: stop claiming, give calls in flight ``grace`` seconds.
    A second one cuts them short."""
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


def _snapshot(
    runner: Runner,
    start: Stats,
    meter: _RateMeter,
    pace: Throughput,
    currency: str,
    *,
    emulated: bool,
) -> Snapshot:
    c = runner.counters
    withdrawn = start.count(State.WITHDRAWN)
    todo = start.total - withdrawn - start.count(State.DONE) - start.count(State.FAILED)
    remaining = max(0, todo - c.done - c.failed)
    rate = runner.rate
    pace.add(time.monotonic(), finished=c.done + c.failed)
    reason = runner.stop_reason
    return Snapshot(
        total=start.total - withdrawn,
        done=start.count(State.DONE) + c.done,
        failed=start.count(State.FAILED) + c.failed,
        remaining=remaining,
        in_flight=runner.in_flight,
        retries=c.retries,
        throttled=c.throttled,
        per_minute=meter.per_minute(c.generated),
        quota_per_minute=rate * 60,
        eta_seconds=pace.eta(remaining=remaining),
        spent=_run_money(c, currency),
        emulated=emulated,
        elapsed=runner.elapsed,
        stopping=reason.value if reason is not None else None,
        run_done=c.done,
        run_failed=c.failed,
    )


def _run_money(counters: RunCounters, currency: str) -> str:
    """This run's cost for the progress line: per currency when its lanes are in both regions
    (never one sum)."""
    amounts: dict[str, Decimal] = {}
    for tally in counters.lanes.values():
        if tally.currency is not None and tally.images:
            amounts[tally.currency] = amounts.get(tally.currency, Decimal(0)) + tally.cost
    if len(amounts) > 1:
        return " + ".join(str(Money(amounts[c], c)) for c in sorted(amounts))
    return str(Money(counters.cost, currency))


async def _progress_loop(view: ProgressView, make: Callable[[], Snapshot]) -> None:
    while True:
        view.update(make())
        await anyio.sleep(0.5)
