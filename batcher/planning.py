"""``batcher plan``: what a run of a manifest would do and cost, with no API call."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio

from jobs import JobStore, Spend, State, Stats
from jobs.spec import KindCounts

from .importing import ImportSummary
from .layout import RunLayout, RunLock
from .models import model_rates
from .pricing import currency_of, price_per_image
from .progress import format_duration
from .summary import amount_text, money_text
from .wording import plural

__all__ = ["Plan", "PlanOptions", "make_plan"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanOptions:
    """What ``batcher plan`` was asked (``manifest`` may be a run folder)."""

    manifest: Path
    out: Path | None
    replace: bool = False
    region: str = "intl"
    rps: float | None = None  # None: each model at its published quota
    emulate: bool = False
    as_json: bool = False
    database: str | None = None  # a postgresql:// URL holding the run's table
    lanes: Path | None = None  # a lanes file: its lanes' regions' prices, their quotas


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The folder's counts after the import, the cost of what is still to generate and the
    time it takes at the quota (``rps`` calls a second)."""

    layout: RunLayout
    manifest: Path
    imported: ImportSummary
    stats: Stats
    cost: dict[str, Decimal]  # currency -> what the pending jobs cost (two: lanes in both regions)
    spend: tuple[Spend, ...]
    rps: float | None
    emulate: bool = False
    to_generate: int = 0  # pending, and running left by a dead run (lease expired, or no lock)
    # model -> (images still to generate, their cost per currency)
    by_model: dict[str, tuple[int, dict[str, Decimal]]] = field(default_factory=dict)
    # model -> calls still to make: jobs, one call (or task) each whatever their n
    calls: dict[str, int] = field(default_factory=dict)

    @property
    def jobs_to_generate(self) -> int:
        """Jobs still to generate (fewer than :attr:`to_generate` images with ``n > 1``)."""
        return sum(self.calls.values()) if self.calls else self.to_generate

    # with lanes: each model's rate, every lane serving it together (None: ``rps``)
    lane_rates: dict[str, float] | None = None

    def _rates(self) -> dict[str, float]:
        return self.lane_rates if self.lane_rates is not None else model_rates(self.rps)

    @property
    def in_progress(self) -> int:
        """Jobs a live run is generating now (running, their lease held): not to do."""
        pending = self.stats.count(State.PENDING)
        return max(0, self.stats.count(State.RUNNING) - (self.jobs_to_generate - pending))

    @property
    def seconds_at_quota(self) -> int | None:
        """How long generating what is pending takes at the quota, at best (None when too
        long to say): models are paced apart, each at ``rps`` or (without one) its published
        quota, so the slowest decides."""
        rates = self._rates()
        if not self.by_model:
            seconds = self.jobs_to_generate / (self.rps or 2.0)
        else:
            seconds = max(
                (
                    self.calls.get(m, n) / rates.get(m, self.rps or 2.0)
                    for m, (n, _) in self.by_model.items()
                ),
                default=0.0,
            )
        return math.ceil(seconds) if math.isfinite(seconds) else None

    def _rate_text(self) -> str:
        if self.lane_rates is not None:
            found = sorted({self.lane_rates.get(m, 0.0) for m in self.by_model})
            if len(found) == 1:
                return f"{found[0]:g}/s over the lanes" + (
                    " per model" if len(self.by_model) > 1 else ""
                )
            return "the lanes' quotas"
        if self.rps is not None:
            return f"{self.rps:g}/s" + (" per model" if len(self.by_model) > 1 else "")
        rates = model_rates(None)
        found = sorted({rates.get(m, 2.0) for m in self.by_model} or {2.0})
        if len(found) == 1:
            return f"{found[0]:g}/s" + (" per model" if len(self.by_model) > 1 else "")
        return "each model's quota"

    def _spent(self, emulated: bool) -> dict[str, Decimal]:
        out: dict[str, Decimal] = {}
        for s in self.spend:
            if s.emulated == emulated:
                out[s.currency] = out.get(s.currency, Decimal(0)) + s.amount
        return out

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        s = self.stats
        return {
            "run_folder": str(self.layout.root),
            "new": self.imported.added,
            "unchanged": self.imported.unchanged_of(s),
            "replaced": self.imported.replaced,
            "total": s.total,
            "done": s.count(State.DONE),
            "pending": s.count(State.PENDING),
            "running": s.count(State.RUNNING),
            "to_generate": self.to_generate,
            "calls_to_make": self.jobs_to_generate,
            "generated": s.count(State.GENERATED),
            "failed": s.count(State.FAILED),
            "withdrawn": s.count(State.WITHDRAWN),
            "moved": self.imported.moved,
            "updated": self.imported.updated,
            **_cost_fields(self.cost),
            "emulated": self.emulate,
            "rps": self.rps,
            "lane_rates": self.lane_rates,
            "seconds_at_quota": self.seconds_at_quota,
            "spent": {c: amount_text(a) for c, a in sorted(self._spent(False).items())},
            "spent_emulated": {c: amount_text(a) for c, a in sorted(self._spent(True).items())},
            "models": {
                m: {"to_generate": n, **_cost_fields(c)}
                for m, (n, c) in sorted(self.by_model.items())
            },
        }

    def text(self) -> str:
        """The form for a person."""
        s, i = self.stats, self.imported
        withdrawn = s.count(State.WITHDRAWN)
        moved = f", {i.moved} moved to a new output path" if i.moved else ""
        if i.updated:
            moved += f", {i.updated} with new variables (images kept)"
        n = self.to_generate
        jobs = self.jobs_to_generate
        calls = f" in {plural(jobs, 'call')}" if jobs != n else ""
        cost = money_text(self.cost) + (" emulated" if self.emulate else "")
        if len(self.cost) > 1:
            cost += " (the jobs shared by the lanes' quotas)"
        lines = [
            f"{self.manifest}: {i.added} new, {i.unchanged_of(s)} already imported, {i.replaced} "
            f"replaced{moved}; {plural(s.total - withdrawn, 'job')} in {self.layout.root}",
            f"  done {s.count(State.DONE)}, pending {jobs}"
            + (f", {self.in_progress} being generated by a run now" if self.in_progress else "")
            + ", awaiting download "
            f"{s.count(State.GENERATED)}, failed {s.count(State.FAILED)}"
            + (
                f", {withdrawn} withdrawn (no longer in the manifest: kept, never generated)"
                if withdrawn
                else ""
            ),
            (
                f"  a run would generate {plural(n, 'image')}{calls} for about {cost}; "
                f"{plural(jobs, 'call') if calls else plural(n, 'image')} at "
                f"{self._rate_text()}: "
                f"~{format_duration(self.seconds_at_quota)} (no API call was made)"
                if n
                else "  nothing left to generate (no API call was made)"
            ),
        ]
        if len(self.by_model) > 1:
            for model, (count, money) in sorted(self.by_model.items()):
                rate = self._rates().get(model, self.rps or 2.0)
                made = self.calls.get(model, count)
                lines.append(
                    f"    {model:<20} {count} images"
                    + (f" in {plural(made, 'call')}" if made != count else "")
                    + f", about {money_text(money)}, "
                    + f"~{format_duration(math.ceil(made / rate))} at {rate:g}/s"
                )
        spent, emulated = self._spent(False), self._spent(True)
        if spent or emulated:
            line = f"  this folder has spent {money_text(spent)}"
            if emulated:
                line += f" ({money_text(emulated)} more emulated, not billed)"
            lines.append(line)
        return "\n".join(lines)


def _cost_fields(cost: dict[str, Decimal]) -> dict[str, Any]:
    """``--json``'s cost fields: ``estimated_cost`` and ``currency`` when one currency (as
    always), both null with two (lanes in both regions: never summed); ``estimated_costs`` per
    currency in every case."""
    one = next(iter(cost.items())) if len(cost) == 1 else None
    return {
        "estimated_cost": str(one[1]) if one else None,
        "currency": one[0] if one else None,
        "estimated_costs": {c: str(a) for c, a in sorted(cost.items())},
    }


Shares = Callable[[str], dict[str, float]]  # model -> region -> the part of its jobs sent there


def _split(count: int, shares: dict[str, float]) -> dict[str, int]:
    """``count`` jobs apportioned to regions by ``shares`` (largest remainders: whole jobs,
    adding up to ``count``).

    >>> _split(10, {"cn": 1 / 3, "intl": 2 / 3})
    {'cn': 3, 'intl': 7}
    """
    total = sum(shares.values())
    exact = {r: count * w / total for r, w in sorted(shares.items())}
    out = {r: math.floor(x) for r, x in exact.items()}
    left = count - sum(out.values())
    for r in sorted(exact, key=lambda r: (out[r] - exact[r], r))[:left]:
        out[r] += 1
    return out


def region_shares(opt: PlanOptions) -> Shares:
    """Where each model's jobs would be sent: ``--region`` alone without lanes; with a lanes
    file, to each region in proportion to the quotas of its lanes serving the model (a job
    goes to whichever lane has a free send slot, so over a run each lane sends at its rate)."""
    if opt.lanes is None:
        region = opt.region
        return lambda _model: {region: 1.0}
    from .lanes import load_lanes
    from .models import MODELS

    lanes = load_lanes(opt.lanes)

    def shares(model: str) -> dict[str, float]:
        entry = MODELS.get(model)
        fallback = entry.quota.rps if entry is not None else 2.0
        out: dict[str, float] = {}
        for lane in lanes:
            if lane.serves(model):
                out[lane.region] = out.get(lane.region, 0.0) + lane.rate_for(model, fallback)
        return out or {lanes[0].region: 1.0}  # no lane serves it: a run refuses it anyway

    return shares


async def _pending_cost(
    store: JobStore, shares: Shares, *, live_run: bool
) -> tuple[dict[str, Decimal], int, dict[str, tuple[int, dict[str, Decimal]]]]:
    """What generating every job still to do would cost, at the prices of the regions they
    would go to (per currency), how many images they are, and both per model. A job a live
    run is generating now (running, its lease held) is not to do; with no live run
    (``live_run`` False: the folder's lock is free), every running job was left by a dead
    one, and the next run takes it back."""
    return _cost_of(await store.pending_by_kind(live_run=live_run), shares)


def _cost_of(
    images_by_kind: dict[tuple[str, bool], int], shares: Shares
) -> tuple[dict[str, Decimal], int, dict[str, tuple[int, dict[str, Decimal]]]]:
    """The cost of generating these images (per (model, prompt_extend)) at the prices of the
    regions they would go to (per currency), how many they are, and both per model."""
    first = shares("z-image-turbo")
    total = {currency_of(r): Decimal(0) for r in first}
    n = 0
    by_model: dict[str, tuple[int, dict[str, Decimal]]] = {}
    for (model, extend), count in images_by_kind.items():
        images, money = by_model.get(model, (0, {}))
        for region, part in _split(count, shares(model)).items():
            cost = (price_per_image(model, region, extend) * part).amount
            currency = currency_of(region)
            total[currency] = total.get(currency, Decimal(0)) + cost
            money[currency] = money.get(currency, Decimal(0)) + cost
        n += count
        by_model[model] = (images + count, money)
    return total, n, by_model


async def make_plan(
    store: JobStore,
    layout: RunLayout,
    manifest: Path,
    imported: ImportSummary,
    opt: PlanOptions,
) -> Plan:
    """The counts by state, the cost of what is pending and what was spent: scans of the whole
    table at a million jobs, so they run at once, on the store's connections (SQLite scans
    without the GIL). The sums of ``stats`` (retries, ...) are not computed. After a first
    import into an empty table whose rows the store counted as they went in
    (``imported.fresh``), the table holds those jobs alone, all pending and none billed: the
    figures come from those counts, without reading the table again (see :func:`_fresh`)."""
    if imported.fresh is not None:
        return _fresh(layout, manifest, imported, imported.fresh, opt)
    found: dict[str, Any] = {}
    # On a shared table (PostgreSQL) workers hold no folder lock: their leases alone tell.
    live_run = layout.shared or RunLock.held(layout.lock)

    async def counts() -> None:
        found["stats"] = await store.stats(totals=False)

    async def pending() -> None:
        found["cost"], found["to_generate"], found["by_model"] = await _pending_cost(
            store, region_shares(opt), live_run=live_run
        )

    async def calls() -> None:
        by_kind = await store.pending_by_kind(live_run=live_run, calls=True)
        found["calls"] = {}
        for (model, _), count in by_kind.items():
            found["calls"][model] = found["calls"].get(model, 0) + count

    async def spend() -> None:
        found["spend"] = await store.spend()

    async with anyio.create_task_group() as tg:
        tg.start_soon(counts)
        tg.start_soon(pending)
        tg.start_soon(calls)
        tg.start_soon(spend)
    return Plan(
        layout=layout,
        manifest=manifest,
        imported=imported,
        stats=found["stats"],
        cost=found["cost"],
        spend=found["spend"],
        rps=opt.rps,
        emulate=opt.emulate,
        to_generate=found["to_generate"],
        by_model=found["by_model"],
        calls=found["calls"],
        lane_rates=lane_rates(opt.lanes) if opt.lanes is not None else None,
    )


def _fresh(
    layout: RunLayout, manifest: Path, imported: ImportSummary, fresh: KindCounts, opt: PlanOptions
) -> Plan:
    """The plan of a table that a first import has just filled (nothing else was in it): every
    job pending and due (none running, so none in progress), nothing failed or billed, the
    images and calls to make the import's own counts. The figures are the same a scan gives
    (a test compares the two); a run working on the folder meanwhile may already have moved
    some of them on, as it may between a scan and the printing of its figures."""
    by_state = {s.value: 0 for s in State}
    by_state[State.PENDING.value] = sum(jobs for jobs, _ in fresh.values())
    stats = Stats(
        by_state=by_state,
        errors_by_code={},
        spend=(),
        attempts=0,
        throttled=0,
        ambiguous=0,
        regenerated=0,
        due_pending=by_state[State.PENDING.value],  # next_attempt_at 0: due at once
    )
    cost, to_generate, by_model = _cost_of(
        {kind: images for kind, (_, images) in fresh.items()}, region_shares(opt)
    )
    calls: dict[str, int] = {}
    for (model, _), (jobs, _) in fresh.items():
        calls[model] = calls.get(model, 0) + jobs
    return Plan(
        layout=layout,
        manifest=manifest,
        imported=imported,
        stats=stats,
        cost=cost,
        spend=(),
        rps=opt.rps,
        emulate=opt.emulate,
        to_generate=to_generate,
        by_model=by_model,
        calls=calls,
        lane_rates=lane_rates(opt.lanes) if opt.lanes is not None else None,
    )


def lane_rates(path: Path) -> dict[str, float]:
    """Each model's rate over the lanes of a lanes file: the quotas of every lane serving it,
    together (the lanes send at once, each paced on its own)."""
    from .lanes import load_lanes
    from .models import MODELS

    rates: dict[str, float] = {}
    for lane in load_lanes(path):
        for model, entry in MODELS.items():
            if lane.serves(model):
                rates[model] = rates.get(model, 0.0) + lane.rate_for(model, entry.quota.rps)
    return rates
