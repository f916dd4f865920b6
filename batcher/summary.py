"""What a person (or a program, with ``--json``) reads about a run folder: the end-of-run
summary, ``batcher status`` and the run's JSON summary.

Money is shown per currency, never summed across currencies, and the emulator's (a rehearsal)
apart from what was spent: ``US$0.03 emulated`` is never money spent.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from jobs import LaneCalls, State, Stats
from jobs.states import ACTIVE

from .layout import RunLayout
from .pricing import Money
from .progress import format_duration
from .wording import plural

if TYPE_CHECKING:
    from .pool import RunCounters, RunResult

__all__ = [
    "achieved_rate",
    "amount_text",
    "lane_lines",
    "lanes_json",
    "money_text",
    "run_json",
    "status_json",
    "status_text",
    "summary_lines",
]


def money_text(amounts: dict[str, Decimal]) -> str:
    """Amounts per currency for a person, never summed: ``CN¥0.20 + US$0.045``.

    >>> money_text({"USD": Decimal("0.045"), "CNY": Decimal("0.2")})
    'CN¥0.20 + US$0.045'
    >>> money_text({})
    'nothing'
    """
    if not amounts:
        return "nothing"
    return " + ".join(str(Money(amounts[c], c)) for c in sorted(amounts))


def amount_text(amount: Decimal) -> str:
    """An amount for ``--json``: at least two decimals, more only when it has them.

    >>> amount_text(Decimal("0.2")), amount_text(Decimal("0.045000"))
    ('0.20', '0.045')
    """
    normal = amount.normalize()
    exponent = normal.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        normal = normal.quantize(Decimal("0.01"))
    return f"{normal:f}"


def _amounts_json(amounts: dict[str, Decimal]) -> dict[str, str]:
    return {c: amount_text(a) for c, a in sorted(amounts.items())}


def _folder_money(stats: Stats) -> str:
    """What the folder's images cost: spent, and apart, emulated."""
    text = f"{plural(stats.images_billed, 'image')} billed, spent {money_text(stats.spent())}"
    emulated = stats.spent(emulated=True)
    if emulated:
        text += (
            f"; {plural(stats.images_emulated, 'image')} from the emulator, "
            f"{money_text(emulated)} emulated (not billed)"
        )
    return text


def achieved_rate(result: RunResult) -> float | None:
    """Calls the service accepted per second while this run sent them: throttled calls and
    calls that never reached it do not count (None with fewer than two accepted)."""
    return result.accepted_per_second


# How a run ended, for a person (the summary's first line); ``--json`` keeps the reason's code.
_ENDED = {
    "aborted": "stopped",
    "limit": "stopped at --limit",
    "budget": "stopped at --budget",
    "unreachable": "stopped (the service could not be reached)",
    "database": "stopped (the job database could not be reached)",
}


def summary_lines(
    *,
    stats: Stats,
    counters: RunCounters,
    elapsed: float,
    reason: str,
    calls_per_second: float | None,
    rps: float,
    currency: str = "USD",
    emulated: bool = False,
    lanes: Sequence[LaneCalls] = (),
    shared: bool = False,
) -> list[str]:
    """The end-of-run summary, a few lines for a person. ``currency`` is the run's (its
    region's); ``emulated``: the run was a rehearsal, whose cost was not spent. ``lanes``:
    this run's figures per lane and model, shown per lane when the run had several lanes.
    ``shared``: the table is shared by workers that may have sent at the same time, so this
    worker's rate is its share of the quota, which the line says."""
    s = stats
    withdrawn = s.count(State.WITHDRAWN)
    by_currency: dict[str, Decimal] = {}
    for row in lanes:
        if row.currency and row.images:
            by_currency[row.currency] = by_currency.get(row.currency, Decimal(0)) + row.cost
    # lanes in both regions: amounts per currency, never summed
    several = len(by_currency) > 1
    cost = money_text(by_currency) if several else str(Money(counters.cost, currency))
    cost = f"{cost} emulated (nothing spent)" if emulated else f"cost {cost}"
    lines = [
        f"run {_ENDED.get(reason, reason)} after {format_duration(elapsed)}: "
        f"{s.count(State.DONE)} done, {s.count(State.FAILED)} failed, "
        f"{sum(s.count(state) for state in ACTIVE)} "
        f"left, of {s.total - withdrawn}"
        + (f" ({withdrawn} withdrawn: no longer in the manifest)" if withdrawn else ""),
        f"this run: {plural(counters.images_generated, 'image')} generated, "
        f"{counters.images_saved} saved, "
        f"{counters.failed} failed, {plural(counters.calls, 'API call')}, "
        f"{plural(counters.retries, 'retry', 'retries')}, {counters.throttled} throttled, "
        f"{plural(counters.ambiguous, 'ambiguous re-send')} (may have been billed), "
        + (f"{counters.abandoned} abandoned (may have been billed), " if counters.abandoned else "")
        + f"{counters.regenerated} regenerated after URL expiry, "
        f"{plural(counters.download_retries, 'download retry', 'download retries')}, {cost}",
    ]
    several = _several_lanes(lanes) or bool(counters.disabled)
    if calls_per_second is not None:
        achieved = _achieved(calls_per_second, rps, counters.throttled, several)
        if shared:
            achieved += (
                " by this worker (workers sharing a lane share its quota: `batcher status` "
                "gives each lane's rate over all of them)"
            )
        lines.append(achieved)
    if several:
        lines += [f"  {line}" for line in lane_lines(lanes, counters.disabled)]
    lines.append(
        f"all runs: {_folder_money(s)}; "
        f"{s.throttled} throttled, {s.ambiguous} ambiguous, {s.regenerated} regenerated"
    )
    if counters.tasks_created or counters.tasks_reattached:
        lines.append(
            f"tasks: {counters.tasks_created} created, {counters.tasks_reattached} reattached "
            f"after an earlier run, {counters.task_polls} polls"
        )
    if len(s.by_model) > 1:
        lines += [f"  {line}" for line in model_lines(s)]
    if s.errors_by_code:
        parts = ", ".join(f"{code} x{n}" for code, n in sorted(s.errors_by_code.items()))
        lines.append(f"failures by code: {parts}")
    return lines


def _achieved(rate: float, rps: float, throttled: int, lanes: bool = False) -> str:
    """The achieved-rate line: calls the service accepted per second. Against ``--rps`` as a
    percentage only when the service took every call: a throttled run met the service's quota,
    not the rate it was told, and a percentage of the latter would mislead. With lanes, against
    the lanes' quotas together (each lane's line says its own)."""
    if lanes:
        return f"achieved {rate:.2f} calls/s over all lanes (their quotas add up to {rps:g}/s)"
    if not throttled:
        return f"achieved {rate:.2f} calls/s against --rps {rps:g} ({100 * rate / rps:.0f}%)"
    return (
        f"achieved {rate:.2f} calls/s accepted by the service "
        f"({plural(throttled, 'throttled call')} not counted; --rps {rps:g})"
    )


def _lane_rate(rows: Iterable[LaneCalls]) -> float | None:
    """Calls accepted per second while the lane sent them. Runs one after another (a resumed
    run) count their own spans, not the idle time between them; runs whose spans overlap
    (several workers sharing the lane's schedule) count as one, their calls together over
    the time from the first one's first accepted call to the last one's last. A span counts
    when it says enough (three calls over a second at least)."""
    spans = sorted(
        (r.first_accepted_at, r.last_accepted_at, r.accepted)
        for r in rows
        if r.first_accepted_at is not None and r.last_accepted_at is not None and r.accepted
    )
    calls = span = 0.0
    at = 0
    while at < len(spans):
        first, last, accepted = spans[at]
        at += 1
        while at < len(spans) and spans[at][0] <= last:  # overlapping: sent at the same time
            last = max(last, spans[at][1])
            accepted += spans[at][2]
            at += 1
        if accepted >= 3 and last - first >= 1.0:
            calls += accepted - 1
            span += last - first
    return calls / span if span else None


def _by_lane(rows: Iterable[LaneCalls]) -> dict[str, dict[str, list[LaneCalls]]]:
    out: dict[str, dict[str, list[LaneCalls]]] = {}
    for r in rows:
        out.setdefault(r.lane, {}).setdefault(r.model, []).append(r)
    return dict(sorted(out.items()))


def _lane_money(rows: Sequence[LaneCalls]) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
    """(spent, emulated) per currency."""
    spent: dict[str, Decimal] = {}
    emulated: dict[str, Decimal] = {}
    for r in rows:
        if r.currency and r.images:
            into = emulated if r.emulated else spent
            into[r.currency] = into.get(r.currency, Decimal(0)) + r.cost
    return spent, emulated


def lane_lines(rows: Sequence[LaneCalls], disabled: Mapping[str, str] | None = None) -> list[str]:
    """One line per lane: its calls, the rate they were accepted at against the lane's quota
    (per model), its throttled answers and what its images cost per currency; ``disabled``
    names the lanes a run disabled, and why."""
    lines = []
    for lane, models in _by_lane(rows).items():
        every = [r for model_rows in models.values() for r in model_rows]
        calls = sum(r.calls for r in every)
        throttled = sum(r.throttled for r in every)
        rates = []
        for model, model_rows in sorted(models.items()):
            quota = model_rows[-1].quota
            rate = _lane_rate(model_rows)
            label = f"{model} " if len(models) > 1 else ""
            if rate is None:
                rates.append(f"{label}quota {quota:g}/s" if quota else f"{label}rate n/a")
            elif quota:
                rates.append(f"{label}{rate:.2f}/s of its {quota:g}/s ({100 * rate / quota:.0f}%)")
            else:
                rates.append(f"{label}{rate:.2f}/s")
        spent, emulated = _lane_money(every)
        money = []
        if spent:
            money.append(f"spent {money_text(spent)}")
        if emulated:
            money.append(f"{money_text(emulated)} emulated")
        line = (
            f"lane {lane}: {plural(calls, 'call')}, {', '.join(rates)}, {throttled} throttled"
            + (f", {', '.join(money)}" if money else ", nothing spent")
        )
        if disabled and lane in disabled:
            line += f"; disabled: {disabled[lane]}"
        lines.append(line)
    for lane, why in (disabled or {}).items():
        if lane not in {r.lane for r in rows}:
            lines.append(f"lane {lane}: no call answered; disabled: {why}")
    return lines


def lanes_json(rows: Sequence[LaneCalls]) -> dict[str, Any]:
    """Per lane: calls, accepted, throttled, per model the rate and quota, money per currency."""
    out: dict[str, Any] = {}
    for lane, models in _by_lane(rows).items():
        every = [r for model_rows in models.values() for r in model_rows]
        spent, emulated = _lane_money(every)
        out[lane] = {
            "calls": sum(r.calls for r in every),
            "accepted": sum(r.accepted for r in every),
            "throttled": sum(r.throttled for r in every),
            "images": sum(r.images for r in every),
            "models": {
                model: {
                    "quota": model_rows[-1].quota,
                    "calls_per_second": _lane_rate(model_rows),
                    "calls": sum(r.calls for r in model_rows),
                    "throttled": sum(r.throttled for r in model_rows),
                }
                for model, model_rows in sorted(models.items())
            },
            "spent": _amounts_json(spent),
            "emulated": _amounts_json(emulated),
        }
    return out


def _several_lanes(rows: Sequence[LaneCalls]) -> bool:
    """Whether lanes are worth a section: several, or one named in a lanes file."""
    names = {r.lane for r in rows}
    return len(names) > 1 or (bool(names) and names != {"default"})


def status_text(stats: Stats, layout: RunLayout, *, live_run: bool = True) -> str:
    """``batcher status``: jobs per state, what was billed, failures by code. ``live_run``
    False (no run holds the folder): running jobs were left by a run that stopped (killed),
    which the line says, so they are not taken for a run still going."""
    buf = io.StringIO()
    withdrawn = stats.count(State.WITHDRAWN)
    tail = f" ({withdrawn} withdrawn: no longer in the manifest)" if withdrawn else ""
    buf.write(f"{layout.root}: {plural(stats.total - withdrawn, 'job')}{tail}\n")
    for state in State:
        note = ""
        if state is State.RUNNING and stats.count(state) and not live_run:
            note = "  (left by a run that stopped; the next run takes them back)"
        buf.write(f"  {state.value:<10} {stats.count(state)}{note}\n")
    spent = stats.spent()
    if spent:
        buf.write(f"  spent {money_text(spent)} ({plural(stats.images_billed, 'image')} billed)\n")
    else:
        buf.write("  spent nothing (no image billed)\n")
    emulated = stats.spent(emulated=True)
    if emulated:
        buf.write(
            f"  rehearsal: {plural(stats.images_emulated, 'image')} from the emulator, "
            f"{money_text(emulated)} emulated (not billed)\n"
        )
    if len(stats.by_model) > 1 or any(m != "z-image-turbo" for m in stats.by_model):
        buf.write("  by model:\n")
        for line in model_lines(stats):
            buf.write(f"    {line}\n")
    if _several_lanes(stats.lanes):
        buf.write("  by lane (all runs):\n")
        for line in lane_lines(stats.lanes):
            buf.write(f"    {line}\n")
    if stats.short_jobs:
        buf.write(
            f"  short of images: {plural(stats.short_jobs, 'done job')} made fewer images than "
            f"asked ({plural(stats.images_short, 'image')} failed at the service, not billed; "
            "the shortfall column of `batcher export` says why, `batcher redo` makes them again)\n"
        )
    if stats.reviews:
        marks = ", ".join(f"{n} {mark}" for mark, n in sorted(stats.reviews.items()))
        buf.write(f"  reviewed: {marks}\n")
    if stats.errors_by_code:
        buf.write("  failures by code:\n")
        for code, n in sorted(stats.errors_by_code.items()):
            buf.write(f"    {code:<28} {n}\n")
    return buf.getvalue()


def _model_spend(stats: Stats, model: str, *, emulated: bool) -> tuple[int, dict[str, Decimal]]:
    images, amounts = 0, dict[str, Decimal]()
    for s in stats.spend:
        if s.model == model and s.emulated == emulated:
            images += s.images
            amounts[s.currency] = amounts.get(s.currency, Decimal(0)) + s.amount
    return images, amounts


def model_lines(stats: Stats) -> list[str]:
    """One line per model: its jobs by state and what its images cost."""
    lines = []
    for model, states in sorted(stats.by_model.items()):
        counts = ", ".join(f"{state} {n}" for state, n in sorted(states.items()) if n)
        images, amounts = _model_spend(stats, model, emulated=False)
        fake, emulated = _model_spend(stats, model, emulated=True)
        money = f"; spent {money_text(amounts)} ({images} images)" if images else ""
        if fake:
            money += f"; {money_text(emulated)} emulated ({fake} images)"
        lines.append(f"{model:<20} {counts}{money}")
    return lines


def models_json(stats: Stats) -> dict[str, Any]:
    """Per model: jobs by state, images billed and spent per currency (real and emulated)."""
    out: dict[str, Any] = {}
    for model, states in sorted(stats.by_model.items()):
        images, amounts = _model_spend(stats, model, emulated=False)
        fake, emulated = _model_spend(stats, model, emulated=True)
        out[model] = {
            "states": dict(sorted(states.items())),
            "images_billed": images,
            "spent": _amounts_json(amounts),
            "images_emulated": fake,
            "emulated": _amounts_json(emulated),
        }
    return out


def status_json(stats: Stats) -> dict[str, Any]:
    """``batcher status --json``: the same as :func:`status_text`, as an object."""
    out: dict[str, Any] = {"total": stats.total}
    for state in State:
        out[state.value] = stats.count(state)
    out.update(
        images_billed=stats.images_billed,
        spent=_amounts_json(stats.spent()),
        images_emulated=stats.images_emulated,
        emulated=_amounts_json(stats.spent(emulated=True)),
        errors_by_code=stats.errors_by_code,
        throttled=stats.throttled,
        ambiguous=stats.ambiguous,
        regenerated=stats.regenerated,
        models=models_json(stats),
        reviews=stats.reviews,
        short_jobs=stats.short_jobs,
        images_short=stats.images_short,
        lanes=lanes_json(stats.lanes),
    )
    return out


def run_json(
    *,
    stats: Stats,
    result: RunResult,
    exit_code: int,
    layout: RunLayout,
    currency: str = "USD",
    emulated: bool = False,
) -> dict[str, Any]:
    """``batcher run --json``: the folder's status, how the run ended and what it did (its
    cost in ``currency``, ``emulated`` when it was a rehearsal)."""
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
            "images_generated": c.images_generated,
            "images_saved": c.images_saved,
            "failed": c.failed,
            "retries": c.retries,
            "throttled": c.throttled,
            "ambiguous": c.ambiguous,
            "abandoned": c.abandoned,
            "regenerated": c.regenerated,
            "download_retries": c.download_retries,
            "cost": amount_text(c.cost),
            "currency": currency,
            "emulated": emulated,
            "accepted": c.accepted,
            "unreached": c.unreached,
            "lease_lost": c.lease_lost,
            "database_outages": c.database_outages,
            "calls_per_second": achieved_rate(result),
            "sending_seconds": (
                round(result.last_call_at - result.first_call_at, 3)
                if result.first_call_at and result.last_call_at
                else None
            ),
            "lanes": lanes_json(result.lanes),
            "lanes_disabled": dict(c.disabled),
        },
        stop_message=result.abort_message,
    )
    return payload
