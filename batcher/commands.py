"""The commands behind the CLI: plan, run, status, export, retry.

Each one is thin: it opens what it needs, calls one function and maps the result to an
:class:`~batcher.exitcodes.ExitCode`. User mistakes surface as exceptions the CLI turns into
one line (:mod:`batcher.cli`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from jobs import JobStore

from .errors import ConfigError
from .exitcodes import ExitCode, exit_code_for
from .export import ExportOptions, check_output, run_export, tell_exported
from .layout import RunLayout, RunLock
from .pricing import currency_of
from .summary import achieved_rate, run_json, status_json, status_text, summary_lines
from .wording import plural

if TYPE_CHECKING:
    from .planning import PlanOptions
    from .pool import RunResult
    from .session import RunCommand, RunOutcome

# plan and run import what they need (the importer, the pool, aiohttp) when called, so
# that export, status and retry start without them.

__all__ = [
    "cmd_export",
    "cmd_plan",
    "cmd_retry",
    "cmd_run",
    "cmd_status",
    "parse_budget",
]

log = logging.getLogger("batcher")


def _warn(msg: str) -> None:
    print(f"batcher: {msg}", file=sys.stderr)


def _existing_layout(folder: Path, database: str | None) -> RunLayout:
    layout = RunLayout.locate(folder, database)
    if not layout.has_store():
        raise layout.no_store()
    return layout


def _writable(layout: RunLayout) -> bool:
    """False for a run folder on read-only media (or one the user may not write)."""
    return os.access(layout.root, os.W_OK) and os.access(layout.db, os.W_OK)


async def _open_existing(layout: RunLayout) -> JobStore:
    """The store of an existing run folder, opened read-only when the folder cannot be written
    (a finished run on read-only media can still be looked at and exported). A run's table
    in PostgreSQL is opened as it is."""
    if layout.shared:
        return await JobStore.open(layout.store, create=False)
    return await JobStore.open(layout.db, create=False, read_only=not _writable(layout))


def _need_writable(layout: RunLayout) -> None:
    """Refuse, in one line, a run folder that cannot be written (a file in its place, a
    read-only folder or medium) before anything is opened in it."""
    root = layout.root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file, not a run folder; choose another --out")
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK) or (
        layout.db.exists() and not os.access(layout.db, os.W_OK)
    ):
        raise ConfigError(f"cannot write the run folder {root}: {existing} is read-only")


async def cmd_plan(opt: PlanOptions) -> ExitCode:
    """Validate and import; no API call. Prints what a run would do."""
    from .folder import is_rehearsal_folder, resolve_target
    from .importing import import_manifest
    from .planning import make_plan, region_shares

    if opt.lanes is not None:  # a bad lanes file before anything is written
        region_shares(opt)
    target = await resolve_target(opt.manifest, opt.out, emulate=opt.emulate, database=opt.database)
    _need_writable(target.layout)
    target.layout.check_database()
    async with await JobStore.open(target.layout.store, stage=True) as store:
        target.layout.remember_database()
        imported = await import_manifest(store, target, replace=opt.replace)
        fresh = imported.fresh is not None  # a first import: no job has an image yet
        if not opt.emulate and await is_rehearsal_folder(store, nothing_billed=fresh):
            opt = dataclasses.replace(opt, emulate=True)  # only a rehearsal may go on there
        plan = await make_plan(store, target.layout, target.manifest, imported, opt)
    print(json.dumps(plan.as_dict()) if opt.as_json else plan.text())
    return ExitCode.OK


async def cmd_status(folder: Path, *, as_json: bool, database: str | None = None) -> ExitCode:
    """Counts per state, spend and failures by code of a run folder."""
    layout = _existing_layout(folder, database)
    async with await _open_existing(layout) as store:
        stats = await store.stats()
    if as_json:
        print(json.dumps(status_json(stats)))
    else:
        live_run = layout.shared or RunLock.held(layout.lock)  # shared: workers hold no lock
        print(status_text(stats, layout, live_run=live_run), end="")
    return ExitCode.OK


async def cmd_export(folder: Path, opt: ExportOptions, *, database: str | None = None) -> ExitCode:
    """Write the run folder's jobs as records or dataset shards (see :mod:`batcher.export`).
    A closed stdout (``| head``) is the CLI's to end quietly."""
    layout = _existing_layout(folder, database)
    check_output(opt)
    async with await _open_existing(layout) as store:
        result = await run_export(store, layout, opt, sys.stdout)
    sys.stdout.flush()
    tell_exported(result, opt)
    return ExitCode.OK


async def cmd_retry(folder: Path, *, code: str | None, database: str | None = None) -> ExitCode:
    """Failed jobs (or those failed with ``code``) back to pending."""
    layout = _existing_layout(folder, database)
    _need_writable(layout)
    # A shared table's workers may be running: the folder's lock is not theirs to take.
    with contextlib.nullcontext() if layout.shared else RunLock(layout.lock):
        async with await JobStore.open(layout.store, create=False) as store:
            n = await store.retry_failed(code=code)
    what = f" with error {code}" if code else ""
    print(
        f"{plural(n, 'failed job')}{what} put back to pending; "
        "run the same command again to retry them"
    )
    return ExitCode.OK


async def cmd_run(cmd: RunCommand) -> ExitCode:
    """Generate every job of the manifest that is due; print the summary."""
    from .session import execute_run

    outcome = await execute_run(cmd)
    code = exit_code_for(outcome.result, outcome.stats)
    _report(cmd, outcome, code)
    return code


def _report(cmd: RunCommand, outcome: RunOutcome, code: ExitCode) -> None:
    from .pool import StopReason

    result, stats, layout = outcome.result, outcome.stats, outcome.layout
    lines = summary_lines(
        stats=stats,
        counters=result.counters,
        elapsed=result.elapsed,
        reason=result.reason.value,
        calls_per_second=_run_rate(cmd, result),
        rps=_run_quota(cmd, result),
        currency=currency_of(cmd.options.region),
        emulated=cmd.emulate,
        lanes=result.lanes,
        shared=layout.shared,
    )
    for line in lines:
        log.info("summary: %s", line)
    if cmd.as_json:
        payload = run_json(
            stats=stats,
            result=result,
            exit_code=code,
            layout=layout,
            currency=currency_of(cmd.options.region),
            emulated=cmd.emulate,
        )
        payload["report"] = str(outcome.report) if outcome.report else None
        print(json.dumps(payload))
    for line in lines:
        _warn(line)
    if result.reason in (StopReason.ABORTED, StopReason.UNREACHABLE, StopReason.DATABASE):
        _warn(f"stopped: {result.abort_message}")
    elif result.reason is StopReason.BUDGET:
        _warn(
            f"stopped early: {result.abort_message}; the budget counts all of this folder's "
            "spend: raise it to go on"
        )
    elif result.reason is StopReason.LIMIT:
        _warn(f"stopped early: {result.abort_message}; run the same command again to go on")
    elif result.reason is StopReason.INTERRUPTED:
        _warn("interrupted; run the same command again to continue where it stopped")
    _warn(f"images are in {layout.images}")
    if outcome.report is not None:
        _warn(f"report: {outcome.report}")


def _run_rate(cmd: RunCommand, result: RunResult) -> float | None:
    """The achieved rate: with a lanes file, the sum of each lane's (its calls interleave
    with the other lanes', so one span over all of them would overstate it)."""
    if cmd.lanes is None:
        return achieved_rate(result)
    from .lanebook import accepted_rate

    rates = [
        rate
        for r in result.lanes
        if (rate := accepted_rate(r.accepted, r.first_accepted_at, r.last_accepted_at)) is not None
    ]
    return sum(rates) if rates else None


def _run_quota(cmd: RunCommand, result: RunResult) -> float:
    """What the achieved rate is measured against: ``--rps``, or with a lanes file, the
    quotas of the lanes and models the run sent, together."""
    if cmd.lanes is None:
        return cmd.options.rps
    quotas = {(r.lane, r.model): r.quota or 0.0 for r in result.lanes if r.calls}
    return sum(quotas.values()) or cmd.options.rps


_CURRENCY_NAMES = {"USD": "USD", "US$": "USD", "$": "USD", "CNY": "CNY", "RMB": "CNY", "¥": "CNY"}


def parse_budget(value: str | None) -> tuple[Decimal | None, str | None]:
    """``--budget AMOUNT[CURRENCY]``: the amount and the currency named, if any.

    >>> parse_budget("5CNY")
    (Decimal('5'), 'CNY')
    >>> parse_budget("2.50")
    (Decimal('2.50'), None)
    """
    if value is None:
        return None, None
    text = value.strip()
    currency = None
    upper = text.upper()
    for name, code in _CURRENCY_NAMES.items():
        if upper.endswith(name):
            currency, text = code, text[: -len(name)].strip()
            break
        if upper.startswith(name):
            currency, text = code, text[len(name) :].strip()
            break
    try:
        amount = Decimal(text)
    except ArithmeticError:
        raise ConfigError(
            f"--budget must be an amount like 12.50, 5CNY or 2.5USD, got {value!r}"
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise ConfigError(f"--budget must be a positive amount, got {value!r}")
    return amount, currency
