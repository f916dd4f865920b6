"""The report's two charts as inline SVG, drawn here (no chart library, nothing fetched).

* the achieved rate over time: images generated per second in equal time buckets, against
  the quota the run asked for (a dashed line);
* the latency distribution: a histogram of call latencies with the median and the 90th and
  99th percentiles marked.

Pure functions of numbers to SVG text; every text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

__all__ = ["latency_histogram", "percentile", "rate_chart"]

W, H = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 14, 34


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, by nearest rank.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.0
    """
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[rank])


def _frame(title: str, body: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
        f'class="chart" aria-label="{escape(title)}"><title>{escape(title)}</title>'
        + "".join(body)
        + "</svg>"
    )


def _empty(title: str, why: str) -> str:
    return _frame(
        title,
        [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="muted">{escape(why)}</text>'],
    )


def _nice(top: float) -> float:
    """A round axis maximum at or above ``top``."""
    if top <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(top))
    for step in (1, 2, 2.5, 5, 10):
        if step * exp >= top:
            return float(step * exp)
    return float(10 * exp)


def _axes(ymax: float, ylabel: str, xlabels: Sequence[tuple[float, str]]) -> list[str]:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    out = [
        f'<line x1="{LEFT}" y1="{TOP + ph}" x2="{LEFT + pw}" y2="{TOP + ph}" class="axis"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + ph}" class="axis"/>',
    ]
    for i in range(5):
        v = ymax * i / 4
        y = TOP + ph - ph * i / 4
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" class="grid"/>')
        out.append(
            f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(f"{v:g}")}</text>'
        )
    out.append(
        f'<text x="12" y="{TOP + ph / 2:.1f}" transform="rotate(-90 12 {TOP + ph / 2:.1f})" '
        f'text-anchor="middle">{escape(ylabel)}</text>'
    )
    for frac, label in xlabels:
        x = LEFT + pw * frac
        out.append(f'<text x="{x:.1f}" y="{H - 14}" text-anchor="middle">{escape(label)}</text>')
    return out


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def rate_chart(times: Sequence[float], *, quota: float | None, buckets: int = 60) -> str:
    """Images generated per second over the run, from each image's generation time."""
    title = "Achieved rate over time (images/s)"
    if len(times) < 2:
        return _empty(title, "not enough generated images to draw a rate")
    t0, t1 = min(times), max(times)
    span = max(t1 - t0, 1.0)
    # about five images a bucket at least, so a short run's line is a rate, not a comb
    buckets = max(2, min(buckets, len(times) // 5))
    width = span / buckets
    counts = [0] * buckets
    for t in times:
        counts[min(buckets - 1, int((t - t0) / width))] += 1
    rates = [c / width for c in counts]
    ymax = _nice(max(max(rates), quota or 0) * 1.1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    body = _axes(ymax, "images/s", [(f, _duration(span * f)) for f in (0.0, 0.25, 0.5, 0.75, 1.0)])
    points = " ".join(
        f"{LEFT + pw * (i + 0.5) / buckets:.1f},{TOP + ph - ph * r / ymax:.1f}"
        for i, r in enumerate(rates)
    )
    body.append(f'<polyline points="{points}" class="series"/>')
    if quota:
        y = TOP + ph - ph * quota / ymax
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" class="quota"/>')
        body.append(
            f'<text x="{LEFT + pw - 2}" y="{y - 4:.1f}" text-anchor="end" class="quota-label">'
            f"{escape(f'quota {quota:g}/s')}</text>"
        )
    return _frame(title, body)


def latency_histogram(latencies_ms: Sequence[float], *, bins: int = 30) -> str:
    """A histogram of call latencies with p50, p90 and p99 marked."""
    title = "Latency distribution (seconds per call)"
    values = sorted(v / 1000 for v in latencies_ms if v is not None and v >= 0)
    if not values:
        return _empty(title, "no call latencies recorded yet")
    top = percentile(values, 0.999) or values[-1]
    top = max(top, 0.001)
    width = top / bins
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v / width))] += 1
    ymax = _nice(max(counts) * 1.1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    body = _axes(ymax, "calls", [(f, f"{top * f:.2g}s") for f in (0.0, 0.25, 0.5, 0.75, 1.0)])
    bar = pw / bins
    for i, c in enumerate(counts):
        if c:
            h = ph * c / ymax
            body.append(
                f'<rect x="{LEFT + bar * i + 0.5:.1f}" y="{TOP + ph - h:.1f}" '
                f'width="{max(bar - 1, 0.5):.1f}" height="{h:.1f}" class="bar"/>'
            )
    for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        v = percentile(values, q)
        x = LEFT + pw * min(v / top, 1.0)
        body.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" class="mark"/>')
        # labels near the right edge go on the left of their line; the three are stacked
        right = x > LEFT + pw * 0.8
        anchor, dx = ("end", -3) if right else ("start", 3)
        y = TOP + 10 + 12 * ("p50", "p90", "p99").index(name)
        body.append(
            f'<text x="{x + dx:.1f}" y="{y}" text-anchor="{anchor}" class="mark-label">'
            f"{escape(f'{name} {v:.2f}s')}</text>"
        )
    return _frame(title, body)
