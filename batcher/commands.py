"""The commands behind the CLI: plan, run, status, export, retry.

Each one is thin: it opens what it needs, calls one function and maps the result to an
:class:`~batcher.exitcodes.ExitCode`. User mistakes surface as exceptions the CLI turns into
one line (:mod:`batcher.cli`).
"""

from __future__ import annotations

import json
import logging
import sys
from decimal import Decimal
from pathlib import Path

from jobs import JobStore

from .errors import ConfigError
from .exitcodes import ExitCode, exit_code_for
from .export import ExportOptions, check_output, run_export, write_stdout_safely
from .folder import resolve_target
from .importing import import_manifest
from .layout import RunLayout, RunLock
from .planning import PlanOptions, make_plan
from .pool import StopReason
from .pricing import currency_of
from .session import RunCommand, RunOutcome, execute_run
from .summary import achieved_rate, run_json, status_json, status_text, summary_lines

__all__ = [
    "PlanOptions",
    "RunCommand",
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


def _existing_layout(folder: Path) -> RunLayout:
    layout = RunLayout(folder)
    if not layout.db.is_file():
        raise ConfigError(f"{folder} is not a batcher run folder (no batcher.db)")
    return layout


async def cmd_plan(opt: PlanOptions) -> ExitCode:
    """Validate and import; no API call. Prints what a run would do."""
    target = await resolve_target(opt.manifest, opt.out, emulate=opt.emulate)
    async with await JobStore.open(target.layout.db) as store:
        imported = await import_manifest(store, target, replace=opt.replace)
        plan = await make_plan(store, target.layout, target.manifest, imported, opt)
    print(json.dumps(plan.as_dict()) if opt.as_json else plan.text())
    return ExitCode.OK


async def cmd_status(folder: Path, *, as_json: bool) -> ExitCode:
    """Counts per state, spend and failures by code of a run folder."""
    layout = _existing_layout(folder)
    async with await JobStore.open(layout.db, create=False) as store:
        stats = await store.stats()
    if as_json:
        print(json.dumps(status_json(stats)))
    else:
        print(status_text(stats, layout), end="")
    return ExitCode.OK


async def cmd_export(folder: Path, opt: ExportOptions) -> ExitCode:
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
        return ExitCode.BROKEN_PIPE
    where = f" to {opt.output}" if opt.output is not None else ""
    if result.fmt in ("parquet", "webdataset"):
        shards = len(result.files) - 1
        _warn(f"exported {result.records} records in {shards} {result.fmt} shards{where}")
    else:
        _warn(f"exported {result.records} records{where}")
    if result.missing:
        _warn(f"warning: {result.missing} done images were not found; exported without them")
    return ExitCode.OK


async def cmd_retry(folder: Path, *, code: str | None) -> ExitCode:
    """Failed jobs (or those failed with ``code``) back to pending."""
    layout = _existing_layout(folder)
    with RunLock(layout.lock):
        async with await JobStore.open(layout.db, create=False) as store:
            n = await store.retry_failed(code=code)
    what = f" with error {code}" if code else ""
    print(f"{n} failed jobs{what} put back to pending; run the same command again to retry them")
    return ExitCode.OK


async def cmd_run(cmd: RunCommand) -> ExitCode:
    """Generate every job of the manifest that is due; print the summary."""
    outcome = await execute_run(cmd)
    code = exit_code_for(outcome.result, outcome.stats)
    _report(cmd, outcome, code)
    return code


def _report(cmd: RunCommand, outcome: RunOutcome, code: ExitCode) -> None:
    result, stats, layout = outcome.result, outcome.stats, outcome.layout
    lines = summary_lines(
        stats=stats,
        counters=result.counters,
        elapsed=result.elapsed,
        reason=result.reason.value,
        calls_per_second=achieved_rate(result),
        rps=cmd.options.rps,
        currency=currency_of(cmd.options.region),
        emulated=cmd.emulate,
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
        print(json.dumps(payload))
    for line in lines:
        _warn(line)
    if result.reason is StopReason.ABORTED:
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
