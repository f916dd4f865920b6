"""How a benchmark reports: a Markdown table, goals met or missed, a saved result, notes.

Each benchmark's ``main`` is :func:`bench_main`: it parses ``--quick``, ``--no-profile`` and
``--profile``, runs the measurement, prints the result, saves it as JSON in
``bench/_work/results`` (``bench.run_all`` turns those into RESULTS.md) and appends it to the
interim notes the lead reads while benchmarks run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .common import NOTES, RESULTS, ROOT, BenchError, core_count


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table (it reads well in a terminal too)."""
    cells = [[str(h) for h in headers], *[[fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return out


@dataclass(kw_only=True)
class Goal:
    """One figure to reach: what, whether it was met, and the measured value in words."""

    text: str
    met: bool
    measured: str


@dataclass(kw_only=True)
class Result:
    """What a benchmark reports: its table, goals, sizes, commands and profiles."""

    name: str
    title: str
    quick: bool
    sizes: str
    table: list[str]
    goals: list[Goal]
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"))
    commit: str = field(default_factory=lambda: commit())
    cores: int = field(default_factory=core_count)
    seconds: float = 0.0

    def markdown(self) -> list[str]:
        lines = [f"## {self.title}", ""]
        lines.append(
            f"{self.date} UTC, commit {self.commit or 'unknown'}, {self.cores} cores, "
            f"{'--quick' if self.quick else 'full'} ({self.sizes}); took {self.seconds:.0f} s."
        )
        lines += ["", *self.table, ""]
        for g in self.goals:
            mark = "met" if g.met else "MISSED"
            lines.append(f"- Goal {g.text}: **{mark}** ({g.measured})")
        if self.goals:
            lines.append("")
        for n in self.notes:
            lines.append(f"- {n}")
        if self.notes:
            lines.append("")
        if self.commands:
            lines.append("Commands:")
            lines.append("")
            lines += [f"    {c}" for c in self.commands]
            lines.append("")
        for p in self.profiles:
            lines += [p, ""]
        return lines

    def save(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}.json"
        path.write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: Path) -> Result:
        data = json.loads(path.read_text())
        data["goals"] = [Goal(**g) for g in data["goals"]]
        return cls(**data)


def commit() -> str:
    """The checked-out commit, and whether batcher/ or jobs/ differ from it (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "-uno", "batcher", "jobs"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" + uncommitted changes in batcher/ or jobs/" if dirty else "")


def note(text: str) -> None:
    """Append to the interim notes the lead reads while the benchmarks run."""
    stamp = dt.datetime.now(dt.UTC).strftime("%H:%M")
    NOTES.parent.mkdir(parents=True, exist_ok=True)  # a new checkout has no bench/_work yet
    with NOTES.open("a", encoding="utf-8") as fh:
        fh.write(f"\n### {stamp} UTC\n{text.rstrip()}\n")


def report(result: Result, started: float) -> int:
    """Print the table, save the result, note it; exit status 0 (a missed goal is a figure)."""
    result.seconds = time.perf_counter() - started
    print("\n".join(result.markdown()))
    result.save()
    note("\n".join(result.markdown()))
    return 0


def want_profile(args: Any, met: bool) -> bool:
    """Profile when a goal was missed (unless ``--no-profile``), or always with ``--profile``."""
    return bool(args.profile) or (not met and not args.no_profile)


def bench_main(
    name: str, doc: str | None, body: Callable[[bool, Any], Result], add_args: Any = None
) -> int:
    """The common ``main``: ``--quick``, pinning, timing, printing and saving."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{name}", description=(doc or "").splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller N (what run_all uses)")
    parser.add_argument("--no-profile", action="store_true", help="skip profiling a missed goal")
    parser.add_argument("--profile", action="store_true", help="profile even if goals are met")
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    try:
        result = body(args.quick, args)
    except BenchError as exc:
        print(f"bench.{name}: could not measure: {exc}", file=sys.stderr)
        note(f"bench.{name}: could not measure: {exc}")
        return 1
    return report(result, started)
