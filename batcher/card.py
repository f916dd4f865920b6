"""The dataset card (``README.md``) written beside Parquet and WebDataset exports.

A Hugging Face dataset card: YAML front matter (language, size category, task, and for
Parquet the ``configs`` that name each split's files) and a few sections a person reads:
what made the images (model, counts, image sizes, prompt languages, cost per currency,
the dates of the run) and a licence section left for the owner to fill in. Every figure
comes from the exported rows, none from the clock, so the card is the same on every export
of the same rows.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from jobs import State
from jobs.version import EMULATOR_ENDPOINT

from .pricing import Money
from .records import iso_utc

__all__ = ["CardFacts", "prompt_language", "write_card"]

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff]")
_LATIN = re.compile("[A-Za-z]")


def prompt_language(prompt: str) -> str:
    """``zh`` for a prompt with Chinese characters, ``en`` for one written in Latin letters,
    else ``other`` (a coarse guess, for the card's language list).

    >>> prompt_language("一只猫"), prompt_language("a cat"), prompt_language("1234")
    ('zh', 'en', 'other')
    """
    if _CJK.search(prompt):
        return "zh"
    if _LATIN.search(prompt):
        return "en"
    return "other"


@dataclass(slots=True)
class CardFacts:
    """Figures gathered row by row while exporting."""

    states: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    sizes: Counter[str] = field(default_factory=Counter)
    languages: Counter[str] = field(default_factory=Counter)
    cost: dict[str, Decimal] = field(default_factory=dict)  # billed, per currency
    emulated: dict[str, Decimal] = field(default_factory=dict)  # a rehearsal's: not billed
    image_bytes: int = 0
    first: float | None = None
    last: float | None = None
    last_job: str | None = None

    def add(self, rec: dict[str, Any], split: str, image_bytes: int) -> None:
        self.states[rec["state"]] += 1
        self.splits[split] += 1
        self.models[rec["model"]] += 1
        self.languages[prompt_language(rec["prompt"])] += 1
        self.image_bytes += image_bytes
        if rec["state"] == State.DONE.value:
            self.sizes[rec["size"]] += 1
        # a job of several images is a row per image, one after another; its cost is the
        # job's, counted once
        first_row = rec["id"] != self.last_job
        self.last_job = rec["id"]
        if rec.get("currency") and first_row:
            into = self.emulated if rec.get("endpoint") == EMULATOR_ENDPOINT else self.cost
            amount = Decimal(rec["cost"])
            into[rec["currency"]] = into.get(rec["currency"], Decimal(0)) + amount
        for stamp in (rec.get("created_at"), rec.get("finished_at")):
            if stamp is not None:
                self.first = stamp if self.first is None else min(self.first, stamp)
                self.last = stamp if self.last is None else max(self.last, stamp)

    @property
    def total(self) -> int:
        return sum(self.states.values())


def _cost_text(facts: CardFacts) -> str:
    """What the images cost, per currency (never summed across currencies); a rehearsal's
    emulated amounts apart, since nobody paid them.

    >>> _cost_text(CardFacts(cost={"USD": Decimal("0.03"), "CNY": Decimal("0.2")}))
    'CN¥0.20 + US$0.03'
    >>> _cost_text(CardFacts(emulated={"USD": Decimal("0.405")}))
    'nothing billed; US$0.405 emulated (a rehearsal: not billed)'
    """

    def text(amounts: dict[str, Decimal]) -> str:
        return " + ".join(str(Money(amounts[c], c)) for c in sorted(amounts))

    if not facts.emulated:
        return text(facts.cost) or "none recorded"
    billed = text(facts.cost) or "nothing billed"
    return f"{billed}; {text(facts.emulated)} emulated (a rehearsal: not billed)"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M" if n < 1_000_000 else "n>1M"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _card_text(fmt: str, facts: CardFacts, files: list[Path], *, embed: bool) -> str:
    languages = sorted(lang for lang in facts.languages if lang != "other")
    head = ["---", "license: other  # choose the licence you share these images under"]
    if languages:
        head += ["language:", *(f"- {lang}" for lang in languages)]
    head += [
        "task_categories:",
        "- text-to-image",
        "size_categories:",
        f"- {_size_category(facts.total)}",
    ]
    if fmt == "parquet" and facts.splits:
        head += ["configs:", "- config_name: default", "  data_files:"]
        for split in sorted(facts.splits):
            name = "train" if split == "data" else split
            head += [f"  - split: {name}", f"    path: {split}-*.parquet"]
    head.append("---")
    what = "Parquet shards" if fmt == "parquet" else "WebDataset tar shards"
    lines = [
        *head,
        "",
        "# Dataset card",
        "",
        f"Images generated from a prompt manifest by batcher, exported as {what}.",
        "",
        "## Contents",
        "",
        f"- records: {facts.total}"
        + "".join(f", {state} {n}" for state, n in sorted(facts.states.items())),
        "- splits: " + ", ".join(f"{s} {n}" for s, n in sorted(facts.splits.items())),
        "- model: " + ", ".join(f"{m} ({n})" for m, n in sorted(facts.models.items())),
        "- image sizes: "
        + (", ".join(f"{s} ({n})" for s, n in sorted(facts.sizes.items())) or "none"),
        f"- image bytes: {_mb(facts.image_bytes)}"
        + ("" if embed or fmt != "parquet" else " (not embedded: the shards name the files)"),
        "- prompt languages: "
        + ", ".join(f"{lang} ({n})" for lang, n in sorted(facts.languages.items())),
        "- cost: " + _cost_text(facts),
        f"- generated between {iso_utc(facts.first) or '-'} and {iso_utc(facts.last) or '-'}",
        "",
        "## Files",
        "",
        *(f"- `{p.name}` ({_mb(p.stat().st_size)})" for p in files),
        "",
        "## Fields",
        "",
        "Each record carries the job's id, prompt, seed, size, the prompt the image was made "
        "from (`actual_prompt`), the file's sha256, what the image cost, ISO 8601 UTC times, "
        "and every column of the manifest row as a field of its own (renamed `var_<name>` "
        "where it would clash with a built-in field).",
        "",
        "## Licence",
        "",
        "_To be filled in by the owner of these images: the licence, and any terms of the "
        "model's service that apply to them._",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, fmt: str, facts: CardFacts, files: list[Path], *, embed: bool) -> Path:
    """Write ``folder/README.md`` (under a temporary name, then renamed); returns its path."""
    target = folder / "README.md"
    temp = folder / ".README.md.part"
    with temp.open("w", encoding="utf-8") as fh:
        fh.write(_card_text(fmt, facts, files, embed=embed))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temp, target)
    return target
