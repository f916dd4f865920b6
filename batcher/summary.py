"""What a person (or a program, with ``--json``) reads about a run folder: the end-of-run
summary, ``batcher status`` and the run's JSON summary."""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

from jobs import State, Stats

from .layout import RunLayout
from .pool import RunCounters, RunResult
from .pricing import Money
from .progress import format_duration

__all__ = ["achieved_rate", "run_json", "status_json", "status_text", "summary_lines"]


def _money(amount: Decimal, currency: str | None) -> str:
    return str(Money(amount, currency or "USD"))


def achieved_rate(result: RunResult) -> float | None:
    """Calls per second between this run's first and last call (None with fewer than two)."""
    c = result.counters
    if result.first_call_at and result.last_call_at and c.calls > 1:
        span = result.last_call_at - result.first_call_at
        return (c.calls - 1) / span if span > 0 else None
    return None


def summary_lines(
    *,
    stats: Stats,
    counters: RunCounters,
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
    """``batcher status``: jobs per state, what was billed, failures by code."""
    buf = io.StringIO()
    buf.write(f"{layout.root}: {stats.total} jobs\n")
    for state in State:
        buf.write(f"  {state.value:<10} {stats.count(state)}\n")
    buf.write(f"  images billed {stats.images_billed}, cost {_money(stats.cost, stats.currency)}\n")
    if stats.errors_by_code:
        buf.write("  failures by code:\n")
        for code, n in sorted(stats.errors_by_code.items()):
            buf.write(f"    {code:<28} {n}\n")
    return buf.getvalue()


def status_json(stats: Stats) -> dict[str, Any]:
    """``batcher status --json``: the same as :func:`status_text`, as an object."""
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
    )
    return out


def run_json(
    *, stats: Stats, result: RunResult, exit_code: int, layout: RunLayout
) -> dict[str, Any]:
    """``batcher run --json``: the folder's status, how the run ended and what it did."""
    c = result.counters
    payload = status_json(stats)
    payload.update(
        reason=result.reason.value,
        exit_code=exit_code,
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
            "calls_per_second": achieved_rate(result),
        },
        stop_message=result.abort_message,
    )
    return payload
