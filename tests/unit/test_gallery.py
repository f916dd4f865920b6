"""The report's pure parts: the charts (SVG text, escaped), the figures from records (money
per currency, never summed across currencies; failures grouped by code) and the thumbnails'
scaling of images in memory, in every mode a run folder may hold."""

from __future__ import annotations

import doctest
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

import batcher.gallery.charts
import batcher.gallery.thumbs
from batcher.gallery.charts import latency_histogram, percentile, rate_chart
from batcher.gallery.data import summarize
from batcher.gallery.thumbs import scaled


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


def _halves(mode: str, size: tuple[int, int], left: object, right: object) -> Image.Image:
    """An image of ``mode``: its left half ``left``, its right half ``right``."""
    im = Image.new(mode, size, left)  # type: ignore[arg-type]
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))  # type: ignore[arg-type]
    return im


def _palette(size: tuple[int, int], *, transparent: bool = False) -> Image.Image:
    im = _halves("P", size, 0, 1)
    im.putpalette([200, 30, 30, 20, 20, 200, 0, 0, 0])
    if transparent:
        im.info["transparency"] = 1
    return im


@pytest.mark.parametrize(
    ("make", "size", "left", "right"),
    [
        # the emulator's palette images: sampled, converted, box-reduced
        (lambda: _palette((1328, 1328)), (320, 320), (200, 30, 30), (20, 20, 200)),
        (lambda: _palette((1024, 1024)), (320, 320), (200, 30, 30), (20, 20, 200)),
        (lambda: _palette((2048, 1024)), (320, 160), (200, 30, 30), (20, 20, 200)),
        (lambda: _palette((1280, 1280), transparent=True), (320, 320), (200, 30, 30), (255,) * 3),
        (lambda: _palette((500, 400)), (320, 256), (200, 30, 30), (20, 20, 200)),
        (lambda: _halves("RGB", (1024, 1024), (10, 200, 10), (250, 250, 0)), (320, 320),
         (10, 200, 10), (250, 250, 0)),
        (lambda: _halves("RGBA", (960, 1280), (10, 200, 10, 255), (0, 0, 0, 0)), (240, 320),
         (10, 200, 10), (255,) * 3),
        (lambda: _halves("LA", (700, 700), (40, 255), (40, 0)), (320, 320), (40,) * 3, (255,) * 3),
        (lambda: _halves("L", (1000, 300), 30, 220), (320, 96), 30, 220),
        (lambda: _halves("1", (640, 640), 0, 1), (320, 320), 0, 255),
        (lambda: _halves("I;16", (800, 800), 0, 65535), (320, 320), 0, 255),
        (lambda: _halves("I;16", (800, 800), 257 * 10, 257 * 128), (320, 320), 10, 128),
        (lambda: _halves("I;16B", (800, 800), 257 * 10, 257 * 128), (320, 320), 10, 128),
        (lambda: _halves("I", (640, 640), 0, 65535), (320, 320), 0, 255),
        (lambda: _halves("F", (640, 640), 0.0, 1.0), (320, 320), 0, 255),
        (lambda: _halves("CMYK", (900, 900), (0, 0, 0, 0), (0, 0, 0, 255)), (320, 320),
         (255,) * 3, (0,) * 3),
        (lambda: _halves("RGB", (200, 100), (1, 2, 3), (4, 5, 6)), (200, 100), (1, 2, 3),
         (4, 5, 6)),
    ],
)  # fmt: skip
def test_thumbnails_fit_the_box_and_keep_the_colours(
    make: object, size: tuple[int, int], left: object, right: object
) -> None:
    """Whatever the mode: the size fits 320 px with the proportions kept, the result is a mode
    a JPEG stores, transparency lies on white, 16-bit values are scaled (not clipped), and
    each half keeps its colour away from the edge between them."""
    thumb = scaled(make())  # type: ignore[operator]
    assert thumb.size == size
    assert thumb.mode in ("RGB", "L")
    w, h = size
    assert thumb.getpixel((w // 8, h // 2)) == left
    assert thumb.getpixel((w - 1 - w // 8, h // 2)) == right
