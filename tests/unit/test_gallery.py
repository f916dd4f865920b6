"""The report's pure parts: the charts (SVG text, escaped) and the figures from records (money
per currency, never summed across currencies; failures grouped by code)."""

from __future__ import annotations

import doctest
import xml.etree.ElementTree as ET

import batcher.gallery.charts
import batcher.gallery.thumbs
from batcher.gallery.charts import latency_histogram, percentile, rate_chart
from batcher.gallery.data import summarize


def record(job_id: str, state: str = "done", **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": job_id,
        "state": state,
        "model": "z-image-turbo",
        "cost": "0",
        "currency": None,
        "review": None,
        "billed": 0,
        "throttled": 0,
        "ambiguous": 0,
        "regenerated": 0,
        "attempts": 1,
        "error_code": None,
        "error_message": None,
        "request_id": None,
    }
    base.update(kw)
    return base


def test_charts_are_well_formed_svg_with_their_marks() -> None:
    times = [1000.0 + i * 0.5 for i in range(200)]
    svg = rate_chart(times, quota=2.0)
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    assert "quota 2/s" in svg and "<polyline" in svg
    hist = latency_histogram([1000.0 + (i % 50) * 40 for i in range(500)])
    ET.fromstring(hist)
    assert "p50" in hist and "p90" in hist and "p99" in hist


def test_charts_without_data_say_so() -> None:
    assert "not enough" in rate_chart([], quota=None)
    assert "no call latencies" in latency_histogram([])


def test_percentile_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.9), percentile(values, 0.99)) == (
        50.0,
        90.0,
        99.0,
    )
    assert percentile([], 0.5) == 0.0


def test_money_is_per_currency_and_per_model_never_summed_across() -> None:
    records = [
        record("a", cost="0.10", currency="CNY", billed=1),
        record("b", cost="0.20", currency="CNY", billed=1, model="qwen-image"),
        record("c", cost="0.015", currency="USD", billed=1),
        record("c2", cost="0.015", currency="USD", billed=1, endpoint="emulator"),
        record("d", state="failed", error_code="DataInspectionFailed", error_message="m1",
               request_id="r1"),
        record("e", state="failed", error_code="DataInspectionFailed", error_message="m1",
               request_id="r2"),
        record("f", state="failed", error_code=None, review="rejected"),
    ]  # fmt: skip
    s = summarize(records)
    assert [(c["currency"], c["emulated"], c["amount"]) for c in s["cost"]] == [
        ("CNY", False, "0.30"),
        ("USD", False, "0.015"),
        ("USD", True, "0.015"),
    ]
    assert s["cost"][2]["text"] == "US$0.015 emulated, not billed"
    assert [m["model"] for m in s["cost"][0]["models"]] == ["qwen-image", "z-image-turbo"]
    assert s["states"] == {"done": 4, "failed": 3}
    assert (s["totals"]["billed"], s["totals"]["emulated"]) == (3, 1)
    assert s["reviews"] == {"rejected": 1}
    first, second = s["failures"]
    assert (first["code"], first["count"], first["ids"]) == ("DataInspectionFailed", 2, ["d", "e"])
    assert first["messages"] == ["m1"] and first["request_ids"] == ["r1", "r2"]
    assert (second["code"], second["count"]) == ("unknown", 1)


def test_doctests() -> None:
    for module in (batcher.gallery.charts, batcher.gallery.thumbs):
        assert doctest.testmod(module).failed == 0
