"""``batcher plan``: what a run of a manifest would do and cost, with no API call."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio

from jobs import JobStore, Spend, State, Stats

from .importing import ImportSummary
from .layout import RunLayout
from .pricing import Money, price_per_image
from .progress import format_duration
from .summary import amount_text, money_text

__all__ = ["Plan", "PlanOptions", "make_plan"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanOptions:
    """What ``batcher plan`` was asked (``manifest`` may be a run folder)."""

    manifest: Path
    out: Path | None
    replace: bool = False
    region: str = "intl"
    rps: float = 2.0
    emulate: bool = False
    as_json: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The folder's counts after the import, the cost of what is still to generate and the
    time it takes at the quota (``rps`` calls a second)."""

    layout: RunLayout
    manifest: Path
    imported: ImportSummary
    stats: Stats
    cost: Money
    spend: tuple[Spend, ...]
    rps: float
    emulate: bool = False

    @property
    def to_generate(self) -> int:
        return self.stats.count(State.PENDING)

    @property
    def seconds_at_quota(self) -> int | None:
        """How long generating what is pending takes at ``rps`` calls a second, at best (None
        when too long to say)."""
        seconds = self.to_generate / self.rps
        return math.ceil(seconds) if math.isfinite(seconds) else None

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
            "generated": s.count(State.GENERATED),
            "failed": s.count(State.FAILED),
            "withdrawn": s.count(State.WITHDRAWN),
            "moved": self.imported.moved,
            "updated": self.imported.updated,
            "estimated_cost": str(self.cost.amount),
            "currency": self.cost.currency,
            "emulated": self.emulate,
            "rps": self.rps,
            "seconds_at_quota": self.seconds_at_quota,
            "spent": {c: amount_text(a) for c, a in sorted(self._spent(False).items())},
            "spent_emulated": {c: amount_text(a) for c, a in sorted(self._spent(True).items())},
        }

    def text(self) -> str:
        """The form for a person."""
        s, i = self.stats, self.imported
        withdrawn = s.count(State.WITHDRAWN)
        moved = f", {i.moved} moved to a new output path" if i.moved else ""
        if i.updated:
            moved += f", {i.updated} with new variables (images kept)"
        n = self.to_generate
        cost = f"{self.cost} emulated" if self.emulate else str(self.cost)
        lines = [
            f"{self.manifest}: {i.added} new, {i.unchanged_of(s)} already imported, {i.replaced} "
            f"replaced{moved}; {s.total - withdrawn} jobs in {self.layout.root}",
            f"  done {s.count(State.DONE)}, pending {n}, awaiting download "
            f"{s.count(State.GENERATED)}, failed {s.count(State.FAILED)}"
            + (
                f", {withdrawn} withdrawn (no longer in the manifest: kept, never generated)"
                if withdrawn
                else ""
            ),
            (
                f"  a run would generate {n} images for about {cost}; "
                f"{n} images at {self.rps:g}/s: ~{format_duration(self.seconds_at_quota)} "
                "(no API call was made)"
                if n
                else "  nothing left to generate (no API call was made)"
            ),
        ]
        spent, emulated = self._spent(False), self._spent(True)
        if spent or emulated:
            line = f"  this folder has spent {money_text(spent)}"
            if emulated:
                line += f" ({money_text(emulated)} more emulated, not billed)"
            lines.append(line)
        return "\n".join(lines)


async def _pending_cost(store: JobStore, region: str) -> Money:
    """What generating every job still to do would cost, at the region's prices."""
    total = Money.zero(price_per_image("z-image-turbo", region, False).currency)
    for (model, extend), count in (await store.pending_by_kind()).items():
        total = total + price_per_image(model, region, extend) * count
    return total


async def make_plan(
    store: JobStore,
    layout: RunLayout,
    manifest: Path,
    imported: ImportSummary,
    opt: PlanOptions,
) -> Plan:
    """The counts by state, the cost of what is pending and what was spent: scans of the whole
    table at a million jobs, so they run at once, on the store's connections (SQLite scans
    without the GIL). The sums of ``stats`` (retries, ...) are not computed."""
    found: dict[str, Any] = {}

    async def counts() -> None:
        found["stats"] = await store.stats(totals=False)

    async def pending() -> None:
        found["cost"] = await _pending_cost(store, opt.region)

    async def spend() -> None:
        found["spend"] = await store.spend()

    async with anyio.create_task_group() as tg:
        tg.start_soon(counts)
        tg.start_soon(pending)
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
    )
