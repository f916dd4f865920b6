"""What a person watching a run sees on stderr: a live panel on a terminal, plain lines elsewhere.

The runner knows nothing of this module; the run command samples a :class:`Snapshot` from it
twice a second and hands it to a view. Every figure says whose it is: the folder's (all runs:
the progress bar, done and failed) or this run's (retries, throttling, rate, ETA, spend).
The ETA comes from the rate jobs actually finished at (:class:`Throughput`), and shows as
``--`` until that rate has settled, never from the rate the pacer aims at.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:  # rich is imported by the live view alone (format_duration is not)
    from rich.console import Console
    from rich.table import Table

__all__ = [
    "PlainProgress",
    "ProgressView",
    "RichProgress",
    "Snapshot",
    "Throughput",
    "format_duration",
    "make_view",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Snapshot:
    """What a view shows at one moment (``done`` and ``failed``: all runs; ``run_*``: this one)."""

    total: int  # jobs in the table
    done: int
    failed: int
    remaining: int  # not yet done or failed
    in_flight: int
    retries: int
    throttled: int
    per_minute: float  # images generated per minute, recent
    quota_per_minute: float  # what the pacer aims at
    eta_seconds: float | None
    spent: str  # e.g. "US$1.23"
    elapsed: float
    stopping: str | None = None
    run_done: int = 0  # done by this run
    run_failed: int = 0  # failed in this run
    emulated: bool = False  # a rehearsal: ``spent`` is emulated money, never spent


class Throughput:
    """Jobs finished per second over the last ``window`` seconds, and the ETA it gives.

    Not settled (``None``) until ``settle`` seconds of observation and ``settle_jobs`` finished
    jobs: a run's first seconds (slow start, the first calls' latency) say little about the
    pace of the rest.

    >>> t = Throughput()
    >>> for s in range(0, 21):
    ...     t.add(float(s), finished=2 * s)
    >>> t.eta(remaining=100)
    50.0
    """

    def __init__(self, *, window: float = 60.0, settle: float = 10.0, settle_jobs: int = 3) -> None:
        self._window = window
        self._settle = settle
        self._settle_jobs = settle_jobs
        self._points: deque[tuple[float, int]] = deque()
        self._first: float | None = None

    def add(self, now: float, *, finished: int) -> None:
        """This run had finished (done or failed) ``finished`` jobs at ``now``."""
        if self._first is None:
            self._first = now
        self._points.append((now, finished))
        while len(self._points) > 2 and now - self._points[1][0] >= self._window:
            self._points.popleft()

    def per_second(self) -> float | None:
        """Jobs finished per second recently; None until settled."""
        if self._first is None or len(self._points) < 2:
            return None
        (t0, c0), (t1, c1) = self._points[0], self._points[-1]
        if t1 - self._first < self._settle or c1 < self._settle_jobs or t1 <= t0:
            return None
        return (c1 - c0) / (t1 - t0)

    def eta(self, *, remaining: int) -> float | None:
        """Seconds until ``remaining`` jobs are finished at the recent pace (None: unknown)."""
        if remaining <= 0:
            return 0.0
        rate = self.per_second()
        return remaining / rate if rate else None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _money(s: Snapshot) -> str:
    """This run's money on the plain line: spent, or in a rehearsal emulated (not billed)."""
    return f"emulated={s.spent} (not billed)" if s.emulated else f"spent={s.spent}"


def _line(s: Snapshot) -> str:
    pct = 100.0 * (s.done + s.failed) / s.total if s.total else 100.0
    tail = f" | stopping: {s.stopping}" if s.stopping else ""
    return (
        f"all runs: {s.done + s.failed}/{s.total} ({pct:.0f}%) done={s.done} failed={s.failed} "
        f"| this run: done={s.run_done} failed={s.run_failed} retrying={s.retries} "
        f"in-flight={s.in_flight} throttled={s.throttled} "
        f"rate={s.per_minute:.1f}/min of {s.quota_per_minute:.0f}/min "
        f"eta={format_duration(s.eta_seconds)} {_money(s)}{tail}"
    )


class ProgressView(Protocol):
    def update(self, snap: Snapshot) -> None: ...
    def close(self, snap: Snapshot | None = None) -> None: ...


class PlainProgress:
    """One line every ``every`` seconds (for logs, CI, pipes)."""

    def __init__(self, stream: TextIO | None = None, every: float = 5.0) -> None:
        self._stream = stream or sys.stderr
        self._every = every
        self._last = 0.0

    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        if now - self._last >= self._every:
            self._last = now
            print("batcher: " + _line(snap), file=self._stream, flush=True)

    def close(self, snap: Snapshot | None = None) -> None:
        if snap is not None:
            print("batcher: " + _line(snap), file=self._stream, flush=True)


class RichProgress:
    """A live panel on a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = console or Console(stderr=True)
        self._live = Live(console=self._console, refresh_per_second=4, transient=False)
        self._live.start()

    def _render(self, s: Snapshot) -> Table:
        from rich.table import Table

        table = Table.grid(padding=(0, 2))
        table.add_column(justify="right", style="bold")
        table.add_column()
        finished = s.done + s.failed
        pct = 100.0 * finished / s.total if s.total else 100.0
        width = 30
        filled = int(width * pct / 100)
        bar = "[green]" + "█" * filled + "[/green]" + "░" * (width - filled)
        table.add_row("all runs", f"{bar} {finished}/{s.total} ({pct:.0f}%)")
        table.add_row(
            "", f"[green]done {s.done}[/green]  [red]failed {s.failed}[/red]  left {s.remaining}"
        )
        table.add_row(
            "this run",
            f"[green]done {s.run_done}[/green]  [red]failed {s.run_failed}[/red]  "
            f"[yellow]retrying {s.retries}[/yellow]  in flight {s.in_flight}",
        )
        table.add_row(
            "rate",
            f"{s.per_minute:.1f} images/min of {s.quota_per_minute:.0f}/min quota  "
            f"(throttled {s.throttled})",
        )
        table.add_row(
            "time", f"elapsed {format_duration(s.elapsed)}  ETA {format_duration(s.eta_seconds)}"
        )
        if s.emulated:
            table.add_row("emulated", f"{s.spent} (this run, not billed)")
        else:
            table.add_row("spent", f"{s.spent} (this run)")
        if s.stopping:
            table.add_row("stopping", f"[yellow]{s.stopping}[/yellow]")
        return table

    def update(self, snap: Snapshot) -> None:
        self._live.update(self._render(snap))

    def close(self, snap: Snapshot | None = None) -> None:
        if snap is not None:
            self._live.update(self._render(snap))
        self._live.stop()


def make_view(enabled: bool = True) -> ProgressView | None:
    """A rich panel when stderr is a terminal, plain lines otherwise; None when disabled."""
    if not enabled:
        return None
    if sys.stderr.isatty():
        return RichProgress()
    return PlainProgress()
