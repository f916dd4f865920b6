"""Jobs of several images through the real CLI: a YAML manifest with ``n``, the files, the
dataset rows and the export, ``status`` and ``redo``; and ``kill -9`` between two downloads of
one job, then a second run that fetches only what is missing and pays for nothing again."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import tarfile
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, EmulatorThread

from ..support import ImageRelay, ServerThread, check_invariants, run_args, run_cli
from .test_crash_points import kill_9, start, wait_for

KEY = "sk-crash-points-5b0e"  # the key test_crash_points' start() passes
ENV = {"DASHSCOPE_API_KEY": KEY}

MANIFEST = """\
defaults:
  model: wan2.2-t2i-flash
  size: 512*512
  n: 3
  prompt_extend: false
jobs:
  - id: lamp
    prompt: a brass desk lamp on white
    output: shop/lamp.png
    negative_prompt: blurry
    watermark: false
  - id: mug
    model: z-image-turbo
    n: 1
    prompt: a blue mug on white
    output: shop/mug.png
"""


@pytest.fixture
def emulator():
    cfg = EmulatorConfig(latency="0", rps=100_000.0, seed=31, api_key=KEY, task_seconds="0.2")
    with EmulatorThread(cfg) as emu:
        yield emu


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_job_of_three_images_from_manifest_to_export_and_redo(
    tmp_path: Path, emulator: EmulatorThread
) -> None:
    manifest = tmp_path / "shop.yaml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    out = tmp_path / "out"
    plan = run_cli("plan", manifest, "--out", out, "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert (planned["to_generate"], planned["calls_to_make"]) == (4, 2)
    assert planned["estimated_cost"] == "0.090"  # 3 x 0.025 + 0.015
    r = run_cli(*run_args(manifest, out, emulator.base_url), env=ENV)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (out / "images" / "shop").glob("*.png"))
    assert names == ["lamp-1.png", "lamp-2.png", "lamp-3.png", "mug.png"]
    s = emulator.stats()
    assert s["tasks_created"] == 1 and s["images_billed"] == 4
    assert check_invariants(out) == {"done": 2}

    # metadata.jsonl: a line per image, with the model and its parameters
    text = (out / "images" / "metadata.jsonl").read_text()
    lines = sorted((json.loads(x) for x in text.splitlines()), key=lambda x: x["file_name"])
    assert [(x["file_name"], x["image_index"], x["n"]) for x in lines] == [
        ("shop/lamp-1.png", 1, 3),
        ("shop/lamp-2.png", 2, 3),
        ("shop/lamp-3.png", 3, 3),
        ("shop/mug.png", 1, 1),
    ]
    lamp = lines[0]
    assert (lamp["model"], lamp["negative_prompt"], lamp["watermark"]) == (
        "wan2.2-t2i-flash",
        "blurry",
        False,
    )
    assert lamp["size"] == "512*512" and lamp["prompt_extend"] is False
    assert lamp["sha256"] == sha(out / "images" / "shop" / "lamp-1.png")
    assert lines[3]["model"] == "z-image-turbo" and lines[3]["negative_prompt"] == ""

    # export: the same rows, each with its file; the cost is the job's (3 images)
    r = run_cli("export", out, "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["id"], x["file"], x["image_index"]) for x in rows] == [
        ("lamp", "images/shop/lamp-1.png", 1),
        ("lamp", "images/shop/lamp-2.png", 2),
        ("lamp", "images/shop/lamp-3.png", 3),
        ("mug", "images/shop/mug.png", 1),
    ]
    assert rows[0]["billed"] == 3 and rows[0]["n"] == 3 and rows[0]["negative_prompt"] == "blurry"
    assert rows[3]["negative_prompt"] is None and rows[3]["watermark"] is None
    r = run_cli("export", out, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [x["file"] for x in table][:2] == ["images/shop/lamp-1.png", "images/shop/lamp-2.png"]
    assert table[0]["model"] == "wan2.2-t2i-flash" and table[0]["shortfall"] == ""

    r = run_cli("export", out, "--format", "webdataset", "-o", tmp_path / "wds")
    assert r.returncode == 0, r.stderr
    [shard] = sorted((tmp_path / "wds").glob("*.tar"))
    with tarfile.open(shard) as tar:
        pngs = [m.name for m in tar.getmembers() if m.name.endswith(".png")]
    assert sorted(name.split("_", 1)[1] for name in pngs) == [
        "lamp-1.png",
        "lamp-2.png",
        "lamp-3.png",
        "mug.png",
    ]

    status = run_cli("status", out, "--json")
    assert (
        json.loads(status.stdout)["images_emulated"] + json.loads(status.stdout)["images_billed"]
        == 4
    )

    # a new output path in the manifest moves every file of the job
    before = {
        name.replace("lamp", "desk-lamp"): sha(out / "images" / "shop" / name) for name in names
    }
    manifest.write_text(MANIFEST.replace("shop/lamp.png", "shop/desk-lamp.png"), encoding="utf-8")
    r = run_cli(*run_args(manifest, out, emulator.base_url), env=ENV)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (out / "images" / "shop").glob("*.png"))
    assert names == ["desk-lamp-1.png", "desk-lamp-2.png", "desk-lamp-3.png", "mug.png"]
    assert {name: sha(out / "images" / "shop" / name) for name in names} == before
    assert emulator.stats()["images_billed"] == 4  # moved, not made again
    assert check_invariants(out) == {"done": 2}

    # redo: all three files go to history/, the job goes back to pending
    r = run_cli("redo", out, "--id", "lamp")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "images" / "shop").glob("*.png")) == ["mug.png"]
    kept = sorted((out / "history" / "shop").glob("*.png"))
    assert [p.name.split(".")[0] for p in kept] == ["desk-lamp-1", "desk-lamp-2", "desk-lamp-3"]
    assert {sha(p) for p in kept} == {before[f"desk-lamp-{i}.png"] for i in (1, 2, 3)}
    with sqlite3.connect(out / "batcher.db") as con:
        assert con.execute("SELECT state FROM jobs WHERE id = 'lamp'").fetchone() == ("pending",)
        assert con.execute("SELECT count(*) FROM job_images").fetchone() == (0,)
        [record] = con.execute("SELECT record FROM job_history WHERE reason = 'redo'").fetchone()
    assert [i["index"] for i in json.loads(record)["images"]] == [1, 2, 3]
    lines = (out / "images" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(x)["file_name"] for x in lines] == ["shop/mug.png"]


def test_kill_9_between_two_downloads_then_only_the_missing_images_come(
    tmp_path: Path, emulator: EmulatorThread
) -> None:
    manifest = tmp_path / "shop.yaml"
    only_lamp = MANIFEST.replace("n: 3", "n: 4").split("  - id: mug")[0]
    manifest.write_text(only_lamp, encoding="utf-8")
    out = tmp_path / "out"
    relay = ImageRelay(emulator.root_url)
    relay.mode, relay.pass_first = "stall", 1  # the first image passes, the second hangs
    db = out / "batcher.db"

    def saved() -> int:
        try:
            with sqlite3.connect(db, timeout=30) as con:
                query = "SELECT count(*) FROM job_images WHERE sha256 IS NOT NULL"
                return int(con.execute(query).fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    with ServerThread(relay.app()) as server:
        base = server.url + "/api/v1"
        proc = start(*run_args(manifest, out, base, "--concurrency", "2"))
        wait_for("a download to hang after one image", lambda: relay.stalled == 1, proc)
        wait_for("the first image to be recorded", lambda: saved() == 1, proc)
        kill_9(proc)
        assert emulator.stats()["images_billed"] == 4
        lamps = sorted(p.name for p in (out / "images" / "shop").glob("lamp-*.png"))
        assert lamps == ["lamp-1.png"]
        relay.mode = "pass"
        before = relay.downloads
        r = run_cli(*run_args(manifest, out, base), env=ENV)
        assert r.returncode == 0, r.stderr
        assert relay.downloads - before == 3  # images 2, 3 and 4 only
    s = emulator.stats()
    assert s["tasks_created"] == 1 and s["images_billed"] == 4 and s["duplicate_billed"] == 0
    assert check_invariants(out) == {"done": 1}
    lamps = sorted(p.name for p in (out / "images" / "shop").glob("lamp-*.png"))
    assert lamps == ["lamp-1.png", "lamp-2.png", "lamp-3.png", "lamp-4.png"]
    lines = (out / "images" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 4
