"""The static report opened from ``file://`` in Chromium: the gallery is exactly the done jobs,
filters and search narrow it, the detail view shows the right fields and earlier versions,
hostile prompts are text, Chinese is Chinese, paging keeps the page small, no console errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from bench.runfolder import fabricate_run, in_thread
from jobs import JobStore
from tests.support import run_args, run_cli

KEY = "sk-browser-tests-41c7"
XSS = "<img src=x onerror=alert(1)>"


def write_manifest(path: Path) -> Path:
    rows = ["id,prompt,size,seed,output"]
    for i in range(8):
        rows.append(f"shoe-{i},A white leather sneaker number {i},512*512,{i},shoes/shoe-{i}.png")
    for i in range(6):
        rows.append(f"茶壶-{i},青花瓷茶壶产品照 第{i}号,512*512,{i},茶具/茶壶-{i}.png")
    for i in range(3):  # the emulator moderates "forbidden": these fail
        rows.append(f"bad-{i},a forbidden object {i},512*512,{i},bad/bad-{i}.png")
    rows.append(f'xss-1,"{XSS}",512*512,1,misc/xss-1.png')
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def db_rows(db: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in con.execute("SELECT * FROM jobs")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run against the emulator: 15 done, 3 failed by moderation, one redone."""
    tmp = tmp_path_factory.mktemp("report")
    manifest, out = write_manifest(tmp / "m.csv"), tmp / "run"
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=5, api_key=KEY, moderate=("forbidden",))
    env = {"DASHSCOPE_API_KEY": KEY}
    with EmulatorThread(cfg) as emu:
        first = run_cli(*run_args(manifest, out, emu.base_url, "--max-attempts", "1"), env=env)
        assert first.returncode == 1, first.stderr  # the moderated ones failed
        assert (
            first.stderr.strip().splitlines()[-1]
            == f"batcher: report: {out / 'report' / 'index.html'}"
        )

        async def reject() -> None:
            async with await JobStore.open(out / "batcher.db", create=False) as store:
                await store.set_review("shoe-3", "rejected")

        in_thread(reject)
        assert run_cli("redo", out, "--rejected").returncode == 0
        again = run_cli(*run_args(manifest, out, emu.base_url, "--max-attempts", "1"), env=env)
        assert again.returncode == 1, again.stderr
    report = run_cli("report", out)
    assert report.returncode == 0, report.stderr
    return out


def open_report(page: Any, index: Path) -> None:
    page.goto(index.as_uri())
    page.wait_for_selector("body[data-ready='1']")


def tile_ids(page: Any) -> list[str]:
    return [t.get_attribute("data-id") for t in page.query_selector_all("#grid .tile")]


def test_the_gallery_shows_exactly_the_done_jobs(page: Any, run_folder: Path) -> None:
    open_report(page, run_folder / "report" / "index.html")
    rows = db_rows(run_folder / "batcher.db")
    done = [job_id for job_id, r in rows.items() if r["state"] == "done"]
    assert len(done) == 15
    assert sorted(tile_ids(page)) == sorted(done)
    counts = {
        tr.get_attribute("data-state"): tr.query_selector("td").inner_text()
        for tr in page.query_selector_all("#state-counts tr")
    }
    assert counts["done"] == "15" and counts["failed"] == "3" and counts["total"] == "18"
    # every thumbnail is a real image that loaded, from the report's own folder
    loaded = page.eval_on_selector_all(
        "#grid .tile img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)"
    )
    assert loaded and all(loaded)
    srcs = page.eval_on_selector_all("#grid .tile img", "imgs => imgs.map(i => i.src)")
    assert all(s.startswith((run_folder / "report" / "thumbs").as_uri()) for s in srcs)
    # a tile with its picture has no "no image" label squeezed beside it, and the
    # picture fills the square: the tile's width, less its border
    assert page.query_selector_all("#grid .tile .noimg") == []
    widths = page.eval_on_selector_all(
        "#grid .tile", "ts => ts.map(t => [t.clientWidth, t.querySelector('img').clientWidth])"
    )
    assert all(img == tile for tile, img in widths), widths


def test_filters_and_search_narrow_the_gallery(page: Any, run_folder: Path) -> None:
    open_report(page, run_folder / "report" / "index.html")
    rows = db_rows(run_folder / "batcher.db")
    page.select_option("#f-folder", "茶具")
    assert sorted(tile_ids(page)) == sorted(i for i in rows if i.startswith("茶壶"))
    page.select_option("#f-folder", "*")
    page.fill("#f-search", "sneaker number 5")
    assert tile_ids(page) == ["shoe-5"]
    page.fill("#f-search", "茶壶-2")
    assert tile_ids(page) == ["茶壶-2"]
    page.fill("#f-search", "")
    page.select_option("#f-state", "failed")
    page.select_option("#f-code", "DataInspectionFailed")
    assert sorted(tile_ids(page)) == ["bad-0", "bad-1", "bad-2"]
    page.select_option("#f-state", "done")
    assert tile_ids(page) == []  # failed with a code and done: nothing
    assert page.is_visible("#empty")
    page.select_option("#f-code", "*")
    page.select_option("#f-model", "z-image-turbo")
    assert len(tile_ids(page)) == 15
    # the failures table names code, message, request ids and job ids, and filters on click
    row = page.query_selector("#failures-table tr[data-code='DataInspectionFailed']")
    assert row is not None
    text = row.inner_text()
    assert "3" in text and "bad-0" in text and "bad-2" in text
    request_ids = {rows[f"bad-{i}"]["request_id"] for i in range(3)}
    assert all(r and r in text for r in request_ids)
    row.query_selector("button").click()
    assert sorted(tile_ids(page)) == ["bad-0", "bad-1", "bad-2"]


def test_the_detail_view_shows_every_field_and_earlier_versions(
    page: Any, run_folder: Path
) -> None:
    open_report(page, run_folder / "report" / "index.html")
    rows = db_rows(run_folder / "batcher.db")
    page.fill("#f-search", "shoe-3")
    page.click(".tile[data-id='shoe-3']")
    assert page.is_visible("#detail")

    def field(name: str) -> str:
        return page.inner_text(f"#d-fields tr[data-field='{name}'] td")

    r = rows["shoe-3"]
    assert field("request_id") == r["request_id"]
    assert field("seed") == str(r["seed"]) and field("sha256") == r["sha256"]
    assert field("prompt") == r["prompt"] and field("size") == r["size"]
    assert field("manifest_seed") == "3"
    assert page.eval_on_selector("#d-img", "i => i.complete && i.naturalWidth") == 512
    con = sqlite3.connect(run_folder / "batcher.db")
    (old_request,) = con.execute(
        "SELECT json_extract(record, '$.request_id') FROM job_history WHERE job_id = 'shoe-3'"
    ).fetchone()
    con.close()
    version = page.query_selector("#d-history .version[data-reason='redo']")
    assert version is not None and old_request in version.inner_text()
    assert version.eval_on_selector("img", "i => i.complete && i.naturalWidth > 0")
    page.keyboard.press("Escape")
    assert not page.is_visible("#detail")
    # Chinese prompts and names are shown as written
    page.fill("#f-search", "茶壶-4")
    page.click(".tile[data-id='茶壶-4']")
    assert field("prompt") == "青花瓷茶壶产品照 第4号"
    assert page.inner_text("#d-title") == "茶壶-4"
    assert field("file") == "images/茶具/茶壶-4.png"
    assert page.eval_on_selector("#d-img", "i => i.complete && i.naturalWidth") == 512


def test_a_hostile_prompt_is_shown_as_text(page: Any, run_folder: Path) -> None:
    open_report(page, run_folder / "report" / "index.html")
    page.fill("#f-search", "xss")
    tile = page.query_selector(".tile[data-id='xss-1']")
    assert tile is not None
    assert tile.query_selector(".prompt").inner_text() == XSS
    assert page.query_selector("img[src='x']") is None
    tile.click()
    assert page.inner_text("#d-fields tr[data-field='prompt'] td") == XSS
    assert page.query_selector("img[src='x']") is None
    page.wait_for_timeout(200)
    assert page.console.dialogs == []  # alert(1) never ran


def test_keys_move_through_the_gallery_and_the_detail_view(page: Any, run_folder: Path) -> None:
    open_report(page, run_folder / "report" / "index.html")
    ids = tile_ids(page)
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert page.get_attribute(".tile.selected", "data-id") == ids[1]
    page.keyboard.press("Enter")
    assert page.inner_text("#d-title") == ids[1]
    page.keyboard.press("ArrowRight")
    assert page.inner_text("#d-title") == ids[2]
    page.keyboard.press("k")
    assert page.inner_text("#d-title") == ids[1]
    page.keyboard.press("Escape")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "f-search"
    # the review buttons are not part of a static report
    assert not page.is_visible("#d-approve")


def test_paging_keeps_a_few_hundred_tiles_in_the_page(page: Any, tmp_path: Path) -> None:
    folder = fabricate_run(tmp_path / "big", jobs=400, done=350)
    assert run_cli("report", folder).returncode == 0
    open_report(page, folder / "report" / "index.html")
    assert len(tile_ids(page)) == 120
    assert "1–120 of 350" in page.inner_text("#pager-top")
    page.click("#pager-top .page-next")
    ids = tile_ids(page)
    assert len(ids) == 120 and ids[0] == "job-00120"
    page.click("#pager-bottom .page-next")
    assert len(tile_ids(page)) == 350 - 240
    assert "241–350 of 350 (page 3 of 3)" in page.inner_text("#pager-bottom")
    assert page.is_disabled("#pager-top .page-next")


def test_a_job_of_several_images_shows_a_count_and_every_image(page: Any, tmp_path: Path) -> None:
    """A job of n > 1 images: its first image with a count in the grid; in the detail view
    every image, and a click on one shows it large; a partial success says what is missing."""
    manifest, out = tmp_path / "m.jsonl", tmp_path / "run"
    manifest.write_text(
        '{"id": "lamp", "prompt": "a brass lamp", "model": "wan2.2-t2i-flash", "n": 4, '
        '"size": "512*512", "output": "shop/lamp.png"}\n',
        encoding="utf-8",
    )
    cfg = EmulatorConfig(
        latency="0", rps=100_000.0, seed=6, api_key=KEY, task_seconds="0.2", faults="task-partial=1"
    )
    with EmulatorThread(cfg) as emu:
        r = run_cli(*run_args(manifest, out, emu.base_url), env={"DASHSCOPE_API_KEY": KEY})
        assert r.returncode == 0, r.stderr
    open_report(page, out / "report" / "index.html")
    assert tile_ids(page) == ["lamp"]
    assert page.inner_text(".tile[data-id='lamp'] .count") == "×3"
    page.click(".tile[data-id='lamp']")
    shown = page.query_selector_all("#d-images a")
    assert [a.get_attribute("data-index") for a in shown] == ["1", "2", "3"]
    assert page.inner_text("#d-fields tr[data-field='shortfall'] td") == (
        "1 of 4 images failed: InternalError.Algo: Inference error."
    )
    shown[2].click()
    assert page.eval_on_selector("#d-img", "i => i.getAttribute('src')").endswith("lamp-3.png")
    page.wait_for_function("document.querySelector('#d-img').complete")
    assert page.eval_on_selector("#d-img", "i => i.naturalWidth") == 512
