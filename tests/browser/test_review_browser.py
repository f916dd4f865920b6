"""The review page in Chromium, served by ``batcher review``: keyboard marks that persist across a
reload and into ``batcher export``, notes, and live updates while a run writes the same folder
(a mark made mid-run is kept, and the run finishes as if nobody were looking)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread
from tests.support import batcher_cmd, run_args, run_cli
from tests.support_review import review_server

KEY = "sk-review-browser-5b8e"


def manifest(path: Path, n: int) -> Path:
    rows = ["id,prompt,size,seed,output"]
    rows += [f"r{i:02d},A photo of vase {i},512*512,{i},vases/r{i:02d}.png" for i in range(n)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorThread]:
    """One emulator for the module: a run folder keeps to the endpoint that made its images."""
    cfg = EmulatorConfig(latency="150", rps=100_000.0, seed=4, api_key=KEY)
    with EmulatorThread(cfg) as emu:
        yield emu


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, emulator: EmulatorThread) -> Path:
    tmp = tmp_path_factory.mktemp("review-browser")
    r = run_cli(
        *run_args(manifest(tmp / "m.csv", 6), tmp / "run", emulator.base_url),
        env={"DASHSCOPE_API_KEY": KEY},
    )
    assert r.returncode == 0, r.stderr
    return tmp / "run"


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def marks(db: Path) -> dict[str, tuple[str | None, str | None]]:
    con = sqlite3.connect(db)
    try:
        return {i: (r, n) for i, r, n in con.execute("SELECT id, review, review_note FROM jobs")}
    finally:
        con.close()


def ready(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body.review[data-ready='1']")


def test_keys_mark_and_marks_persist_across_reload_and_into_export(page: Any, run: Path) -> None:
    with review_server(run) as server:
        ready(page, server.url)
        assert page.is_visible("#d-approve") is False  # no detail open yet
        page.keyboard.press("j")  # select the first tile
        page.keyboard.press("Enter")
        assert page.inner_text("#d-title") == "r00"
        page.keyboard.press("a")  # approve, then on to the next
        page.wait_for_function("document.querySelector('#d-title').textContent === 'r01'")
        page.keyboard.press("r")
        page.wait_for_function("document.querySelector('#d-title').textContent === 'r02'")
        page.keyboard.press("n")
        assert page.evaluate("document.activeElement.id") == "d-note"
        page.keyboard.type("glaze is uneven — 釉面不均 <img src=x onerror=alert(2)>")
        page.click("#d-note-save")
        page.wait_for_function("document.querySelector('#d-status').textContent.includes('saved')")
        page.keyboard.press("Escape")
        assert marks(run / "batcher.db") == {
            "r00": ("approved", None),
            "r01": ("rejected", None),
            "r02": (None, "glaze is uneven — 釉面不均 <img src=x onerror=alert(2)>"),
            "r03": (None, None),
            "r04": (None, None),
            "r05": (None, None),
        }
        page.reload()
        page.wait_for_selector("body.review[data-ready='1']")
        assert "approved" in page.get_attribute(".tile[data-id='r00']", "class")
        assert "rejected" in page.get_attribute(".tile[data-id='r01']", "class")
        page.select_option("#f-review", "approved")
        ids = [t.get_attribute("data-id") for t in page.query_selector_all("#grid .tile")]
        assert ids == ["r00"]
        page.select_option("#f-review", "*")
        page.click(".tile[data-id='r02']")
        assert (
            page.input_value("#d-note") == "glaze is uneven — 釉面不均 <img src=x onerror=alert(2)>"
        )
        page.keyboard.press("u")  # no mark to remove on r02: nothing changes
        page.keyboard.press("Escape")
        exported = run_cli("export", run)
    records = {json.loads(x)["id"]: json.loads(x) for x in exported.stdout.splitlines()}
    assert records["r00"]["review"] == "approved" and records["r01"]["review"] == "rejected"
    assert (
        records["r02"]["review_note"] == "glaze is uneven — 釉面不均 <img src=x onerror=alert(2)>"
    )


def test_new_images_appear_while_a_run_writes_and_a_mark_mid_run_is_kept(
    page: Any, run: Path, tmp_path: Path, emulator: EmulatorThread
) -> None:
    bigger = manifest(tmp_path / "m.csv", 30)  # 24 more jobs than the run folder has done
    emu = emulator
    with review_server(run) as server:
        ready(page, server.url)
        assert len(page.query_selector_all("#grid .tile")) == 6
        with subprocess.Popen(
            batcher_cmd(*run_args(bigger, run, emu.base_url, "--rps", "8")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**_env(), "DASHSCOPE_API_KEY": KEY},
        ) as proc:
            try:
                # new tiles arrive while the run is still going
                page.wait_for_function(
                    "document.querySelectorAll('#grid .tile').length > 6", timeout=30_000
                )
                assert proc.poll() is None, "the run ended before the page saw anything new"
                page.click(".tile[data-id='r03']")
                page.keyboard.press("r")  # a mark while the run writes the same database
                page.wait_for_function(
                    "document.querySelector('#d-status').textContent.includes('r03')"
                )
                page.keyboard.press("Escape")
                out, err = proc.communicate(timeout=90)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == 0, err
        page.wait_for_function(
            "document.querySelectorAll('#grid .tile').length === 30", timeout=15_000
        )
        counts = page.inner_text("#state-counts tr[data-state='done'] td")
        assert counts == "30"
    assert marks(run / "batcher.db")["r03"] == ("rejected", None)
    lines = (run / "images" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30
    assert {json.loads(x)["id"]: json.loads(x)["review"] for x in lines}["r03"] == "rejected"
    del out


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DASHSCOPE_API_KEY"}


def test_the_page_polls_for_changes_and_a_page_without_the_token_cannot_mark(
    page: Any, run: Path
) -> None:
    with review_server(run) as server:
        ready(page, server.url)
        page.wait_for_function(
            "document.querySelector('#mode').textContent.includes('live')", timeout=10_000
        )
        # the same page without the token is a read-only gallery: no review controls
        page.goto(server.url.split("?")[0])
        page.wait_for_selector("body[data-ready='1']")
        assert page.evaluate("document.body.classList.contains('review')") is False
        page.keyboard.press("j")
        page.keyboard.press("a")
        page.wait_for_timeout(300)
    assert all(m == (None, None) for m in marks(run / "batcher.db").values())
