"""``batcher plan``: what a run of a manifest would do and cost, with no API call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from jobs import JobStore, State, Stats

from .importing import ImportSummary
from .layout import RunLayout
from .pricing import Money, price_per_image

__all__ = ["Plan", "PlanOptions", "make_plan"]


@dataclass(frozen=True, kw_only=True, slots=True)
class PlanOptions:
    """What ``batcher plan`` was asked."""

    manifest: Path
    out: Path | None
    replace: bool = False
    region: str = "intl"
    as_json: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """The folder's counts after the import and the cost of what is still to generate."""

    layout: RunLayout
    manifest: Path
    imported: ImportSummary
    stats: Stats
    cost: Money

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        s = self.stats
        return {
            "run_folder": str(self.layout.root),
            "new": self.imported.added,
            "unchanged": self.imported.unchanged,
            "replaced": self.imported.replaced,
            "total": s.total,
            "done": s.count(State.DONE),
            "pending": s.count(State.PENDING),
            "generated": s.count(State.GENERATED),
            "failed": s.count(State.FAILED),
            "estimated_cost": str(self.cost.amount),
            "currency": self.cost.currency,
        }

    def text(self) -> str:
        """The form for a person."""
        s, i = self.stats, self.imported
        return (
            f"{self.manifest}: {i.added} new, {i.unchanged} already imported, {i.replaced} "
            f"replaced; {s.total} jobs in {self.layout.root}\n"
            f"  done {s.count(State.DONE)}, pending {s.count(State.PENDING)}, awaiting download "
            f"{s.count(State.GENERATED)}, failed {s.count(State.FAILED)}\n"
            f"  a run would generate {s.count(State.PENDING)} images for about {self.cost} "
            f"(no API call was made)"
        )


async def _pending_cost(store: JobStore, region: str) -> Money:
    """What generating every job still to do would cost, at the region's prices."""
    total = Money.zero(price_per_image("z-image-turbo", region, False).currency)
    for (model, extend), count in (await store.pending_by_kind()).items():
        total = total + price_per_image(model, region, extend) * count
    return total


async def make_plan(
    store: JobStore, layout: RunLayout, manifest: Path, imported: ImportSummary, region: str
) -> Plan:
    """The counts by state and the cost of what is pending: two scans of the whole table at a
    million jobs, so they run at once, on two of the store's connections (SQLite scans without
    the GIL). The sums of ``stats`` (billed, cost, retries) are not computed."""
    found: dict[str, Any] = {}

    async def counts() -> None:
        found["stats"] = await store.stats(totals=False)

    async def pending() -> None:
        found["cost"] = await _pending_cost(store, region)

    async with anyio.create_task_group() as tg:
        tg.start_soon(counts)
        tg.start_soon(pending)
    return Plan(
        layout=layout,
        manifest=manifest,
        imported=imported,
        stats=found["stats"],
        cost=found["cost"],
    )
