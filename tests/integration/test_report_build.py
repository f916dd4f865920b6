"""Building the report from a real run folder: thumbnails made once and reused, the data files
loadable as scripts, stale chunks removed, hostile text escaped in the page, and the output
folder checks (a run's thumbnails may come before the page)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from urllib.parse import unquote

import pytest

from batcher.errors import ConfigError
from batcher.gallery.site import build_report, check_output
from batcher.layout import RunLayout
from bench.runfolder import fabricate_run
from jobs import JobStore

pytestmark = pytest.mark.anyio


def chunk_records(path: Path) -> list[dict[str, object]]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("BATCHER.add(") and text.endswith(");\n")
    return list(json.loads(text[len("BATCHER.add(") : -3]))


async def test_thumbnails_are_made_once_and_the_data_is_complete(tmp_path: Path) -> None:
    root = fabricate_run(tmp_path / "run", jobs=12, done=10, size=512)
    layout = RunLayout(root)
    async with await JobStore.open(layout.db, create=False) as store:
        first = await build_report(store, layout, processes=1)
        assert (first.jobs, first.thumbs_made, first.thumbs_missing) == (12, 10, 0)
        again = await build_report(store, layout, processes=1)
        assert again.thumbs_made == 0
    records = chunk_records(layout.report / "data" / "jobs-000.js")
    assert len(records) == 12
    done = [r for r in records if r["state"] == "done"]
    assert len(done) == 10 and all((layout.report / str(r["thumb"])).is_file() for r in done)
    # image URLs are relative and percent-encoded (Chinese folder names included)
    assert all((layout.report / unquote(str(r["image"]))).resolve().is_file() for r in done)
    assert any("%E8%8C%B6%E5%85%B7" in str(r["image"]) for r in done)
    assert {r["folder"] for r in records} == {"shoes", "bags", "lamps", "茶具"}
    summary = (layout.report / "data" / "summary.js").read_text(encoding="utf-8")
    assert summary.startswith("BATCHER.setSummary(")


async def test_hostile_text_is_escaped_in_the_page(tmp_path: Path) -> None:
    root = fabricate_run(tmp_path / "run", jobs=3, done=1, size=512)
    hostile = "</script><img src=x onerror=alert(1)>"
    con = sqlite3.connect(root / "batcher.db")
    con.execute(
        "UPDATE jobs SET state = 'failed', error_code = ?, error_message = ?, request_id = ?, "
        "prompt = ? WHERE id = 'job-00002'",
        (hostile, hostile, hostile, hostile),
    )
    con.commit()
    con.close()
    layout = RunLayout(root)
    async with await JobStore.open(layout.db, create=False) as store:
        await build_report(store, layout, processes=1)
    page = (layout.report / "index.html").read_text(encoding="utf-8")
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert '<meta charset="utf-8">' in page
    data = (layout.report / "data" / "jobs-000.js").read_text(encoding="utf-8")
    assert "</script>" not in data  # written as <\/script>, the same string once parsed
    assert [r["prompt"] for r in chunk_records(layout.report / "data" / "jobs-000.js")][
        2
    ] == hostile


async def test_stale_chunks_go_when_the_table_shrinks(tmp_path: Path, monkeypatch) -> None:
    import batcher.gallery.site as site

    root = fabricate_run(tmp_path / "run", jobs=7, done=2, size=512)
    layout = RunLayout(root)
    monkeypatch.setattr(site, "CHUNK", 3)
    async with await JobStore.open(layout.db, create=False) as store:
        await build_report(store, layout, processes=1)
        assert sorted(p.name for p in (layout.report / "data").glob("jobs-*.js")) == [
            "jobs-000.js",
            "jobs-001.js",
            "jobs-002.js",
        ]
        monkeypatch.setattr(site, "CHUNK", 5)
        await build_report(store, layout, processes=1)
    names = sorted(p.name for p in (layout.report / "data").glob("jobs-*.js"))
    assert names == ["jobs-000.js", "jobs-001.js"]
    page = (layout.report / "index.html").read_text(encoding="utf-8")
    assert "jobs-001.js" in page and "jobs-002.js" not in page


def test_the_output_folder_checks(tmp_path: Path) -> None:
    check_output(tmp_path / "new")  # not there yet: fine
    thumbs_only = tmp_path / "r1"
    (thumbs_only / "thumbs" / "ab").mkdir(parents=True)  # a run's thumbnails came first
    check_output(thumbs_only)
    other = tmp_path / "r2"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no report"):
        check_output(other)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        check_output(tmp_path / "file")


def test_thumbnail_files_of_every_kind(tmp_path: Path) -> None:
    """Real files through the thumbnail maker, two worker processes: a JPEG (decoded at a
    fraction of its size), a 16-bit PNG (scaled, not clipped), a palette PNG with a transparent
    colour (on white), the emulator's own picture; a file that is no image is left out."""
    from PIL import Image

    from batcher.emulator.images import render_png
    from batcher.gallery.thumbs import ThumbJob, make_thumbs

    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (1600, 1200), (30, 120, 200)).save(src / "photo.jpg", quality=90)
    Image.new("I;16", (700, 700), 257 * 100).save(src / "deep.png")
    pal = Image.new("P", (1280, 1280), 1)
    pal.putpalette([250, 0, 0, 0, 250, 0])
    pal.paste(0, (0, 0, 640, 1280))
    pal.save(src / "clear.png", transparency=1)
    (src / "emulator.png").write_bytes(render_png(prompt="a lamp", seed=1, width=1328, height=1328))
    (src / "broken.png").write_bytes(b"not an image")
    names = ["photo.jpg", "deep.png", "clear.png", "emulator.png", "broken.png"]
    jobs = [ThumbJob(src / n, tmp_path / "thumbs" / n[:2] / f"{n}.jpg") for n in names] * 52
    assert make_thumbs(jobs, processes=2) == 4 * 52  # over 256: made by worker processes

    def thumb(name: str) -> Image.Image:
        with Image.open(tmp_path / "thumbs" / name[:2] / f"{name}.jpg") as im:
            return im.copy()

    photo = thumb("photo.jpg")
    assert photo.size == (320, 240)
    r, g, b = photo.getpixel((160, 120))  # type: ignore[misc]
    assert abs(r - 30) <= 3 and abs(g - 120) <= 3 and abs(b - 200) <= 3
    deep = thumb("deep.png")
    assert deep.size == (320, 320) and abs(deep.getpixel((160, 160)) - 100) <= 2  # type: ignore[operator]
    clear = thumb("clear.png")
    red, white = clear.getpixel((60, 160)), clear.getpixel((260, 160))
    assert isinstance(red, tuple) and isinstance(white, tuple)
    assert red[0] >= 245 and min(white) >= 250
    assert thumb("emulator.png").size == (320, 320)
    assert not (tmp_path / "thumbs" / "br" / "broken.png.jpg").exists()
    assert not list((tmp_path / "thumbs").rglob("*.part"))
