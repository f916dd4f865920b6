"""Output paths. Ids and template values that try ``..``, absolute paths,
drive letters, device names and characters common file systems refuse; symlinks planted in the
run folder's ``images/``; names that differ only by case (or Unicode normalisation, or only
after being cut to 255 bytes). Nothing may be written outside the run folder, and collisions are
refused before anything is imported. The real manifest reader, a real SQLite file, the emulator.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

import pytest

from batcher.emulator import EmulatorConfig, running_emulator
from batcher.errors import ConfigError
from batcher.layout import RunLayout, RunLock
from jobs import JobStore, ManifestInvalid, State
from jobs.manifest import open_manifest
from tests.support import check_invariants, files_under, run_once

pytestmark = pytest.mark.anyio

HOSTILE_IDS = [
    "../../escape",
    "/etc/passwd",
    "a/../../b",
    "..",
    ".",
    "...",
    "x\\..\\y",
    "C:\\Windows\\evil",
    "CON",
    "nul",
    "com1.png",
    "LPT9",
    "a:b",
    'a<b>c"d|e?f*g',
    "trailing. ",
    "名前/../x",
    "~root",
    "$HOME",
    "%2e%2e%2fx",
    "a" * 300,
    "é" * 200,  # 400 UTF-8 bytes
]
DEVICES = re.compile(r"(?i)^(con|prn|aux|nul|com[1-9¹²³]|lpt[1-9¹²³])(\..*)?$")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def emu():
    return EmulatorConfig(latency="0", rps=100_000.0, seed=2)


def assert_portable(rel: str) -> None:
    """A path every common file system (ext4, APFS, NTFS, FAT) can hold as it is."""
    for part in rel.split("/"):
        assert part not in ("", ".", ".."), rel
        assert not re.search(r'[\x00-\x1f\x7f<>:"|?*\\]', part), rel
        assert not part.endswith((".", " ")), rel
        assert not DEVICES.match(part), rel
        assert len(part.encode("utf-8")) <= 255, rel
        assert unicodedata.normalize("NFC", part) == part, rel


async def test_hostile_ids_and_values_stay_inside_the_run_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    rows = [
        {"id": x, "prompt": f"a photo {i}", "size": "512*512"} for i, x in enumerate(HOSTILE_IDS)
    ]
    # values substituted into a template with folders may not add folders of their own
    rows += [
        {"id": "v1", "prompt": "p", "output": "{cat}/{sub}/{id}", "cat": "../..", "sub": "/etc"},
        {"id": "v2", "prompt": "p", "output": "{cat}/{id}.png", "cat": "C:"},
        {"id": "v3", "prompt": "p", "output": "{cat}/{id}.png", "cat": "a/../../../b"},
    ]
    manifest = write_jsonl(tmp_path / "hostile.jsonl", rows)
    layout = RunLayout(tmp_path / "run")
    before = files_under(tmp_path) - {"hostile.jsonl"}
    async with (
        await JobStore.open(layout.db) as store,
        running_emulator(emu()) as e,
    ):
        await store.import_specs(open_manifest(manifest), source=str(manifest))
        await run_once(store, layout, e.base_url)
        stats = await store.stats()
        outputs = [rec["output"] async for rec in store.iter_records()]
    assert stats.count(State.DONE) == len(rows)
    after = files_under(tmp_path)
    new = {p for p in after - before if p != "hostile.jsonl"}
    assert all(p.startswith("run" + os.sep) for p in new), sorted(new)
    assert files_under(outside) == {"keep.txt"}
    assert (outside / "keep.txt").read_text() == "untouched"
    for rel in outputs:
        assert_portable(rel)
        assert (layout.images / rel).resolve().is_relative_to(layout.images.resolve())
    assert len({o.casefold() for o in outputs}) == len(rows)
    assert check_invariants(layout.root) == {"done": len(rows)}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param("Photo", "photo", id="case"),
        pytest.param("ß", "SS", id="casefold"),
        pytest.param("ΣΑΣ", "σας", id="final-sigma"),
        pytest.param("café", "cafe\u0301", id="nfc-nfd"),
        pytest.param("a:b", "a_b", id="illegal-char-replaced"),
        pytest.param("x/y", "x_y", id="slash-replaced"),
        pytest.param("CON", "_CON", id="device-name"),
        pytest.param("a" * 300 + "1", "a" * 300 + "2", id="cut-to-255-bytes"),
    ],
)
async def test_files_that_would_collide_are_refused_up_front(tmp_path, first, second):
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"id": first, "prompt": "one"}, {"id": second, "prompt": "two"}]
    )
    layout = RunLayout(tmp_path / "run")
    async with await JobStore.open(layout.db) as store:
        with pytest.raises(ManifestInvalid) as info:
            await store.import_specs(open_manifest(manifest), source=str(manifest))
        assert (await store.stats()).total == 0  # nothing imported
    message = str(info.value)
    assert message.startswith(f"{manifest}:2: ")
    assert len(message.splitlines()) == 1


async def test_a_collision_with_an_earlier_import_is_refused_up_front(tmp_path):
    layout = RunLayout(tmp_path / "run")
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": "Chair", "prompt": "a chair"}])
    second = write_jsonl(
        tmp_path / "b.jsonl", [{"id": "lamp", "prompt": "a lamp"}, {"id": "CHAIR", "prompt": "x"}]
    )
    async with await JobStore.open(layout.db) as store:
        await store.import_specs(open_manifest(first), source=str(first))
        with pytest.raises(ManifestInvalid, match=r"b\.jsonl:2: output: .*Chair"):
            await store.import_specs(open_manifest(second), source=str(second))
        assert (await store.stats()).total == 1  # the lamp was not imported either


async def test_symlinks_planted_in_images_are_never_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.png"
    victim.write_bytes(b"not yours")
    layout = RunLayout(tmp_path / "run")
    rows = [
        {"id": "through-dir", "prompt": "p1", "output": "{cat}/{id}.png", "cat": "linked"},
        {"id": "deep", "prompt": "p2", "output": "{cat}/inner/{id}.png", "cat": "linked"},
        {"id": "through-file", "prompt": "p3"},
        {"id": "through-parent", "prompt": "p4", "output": "real/{cat}/{id}.png", "cat": "up"},
        {"id": "fine", "prompt": "p5", "output": "{cat}/{id}.png", "cat": "ok"},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    layout.images.mkdir(parents=True)
    (layout.images / "linked").symlink_to(outside, target_is_directory=True)
    (layout.images / "through-file.png").symlink_to(victim)
    (layout.images / "real").mkdir()
    (layout.images / "real" / "up").symlink_to("../../../outside", target_is_directory=True)
    async with (
        await JobStore.open(layout.db) as store,
        running_emulator(emu()) as e,
    ):
        await store.import_specs(open_manifest(manifest), source=str(manifest))
        runner, _ = await run_once(store, layout, e.base_url)
        recs = {rec["id"]: rec async for rec in store.iter_records()}
    assert sorted(os.listdir(outside)) == ["victim.png"]
    assert victim.read_bytes() == b"not yours"
    assert (layout.images / "through-file.png").is_symlink()
    for job_id in ("through-dir", "deep", "through-file", "through-parent"):
        rec = recs[job_id]
        assert rec["state"] == "failed", rec
        assert rec["error_code"] == "UnsafeOutputPath"
        assert "symlink" in rec["error_message"] or "not a regular file" in rec["error_message"]
    assert recs["fine"]["state"] == "done"
    assert runner.counters.failures == {"UnsafeOutputPath": 4}
    check_invariants(layout.root)


async def test_things_in_the_way_of_an_output_fail_that_job_only(tmp_path):
    layout = RunLayout(tmp_path / "run")
    rows = [
        {"id": "dir-in-the-way", "prompt": "p1"},
        {"id": "x", "prompt": "p2", "output": "{cat}/{id}.png", "cat": "file-in-the-way"},
        {"id": "fine", "prompt": "p3"},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    layout.images.mkdir(parents=True)
    (layout.images / "dir-in-the-way.png").mkdir()
    (layout.images / "file-in-the-way").write_text("a file, not a folder")
    async with (
        await JobStore.open(layout.db) as store,
        running_emulator(emu()) as e,
    ):
        await store.import_specs(open_manifest(manifest), source=str(manifest))
        await run_once(store, layout, e.base_url)
        recs = {rec["id"]: rec async for rec in store.iter_records()}
    assert recs["dir-in-the-way"]["error_code"] == "UnsafeOutputPath"
    assert recs["x"]["error_code"] == "UnsafeOutputPath"
    assert recs["fine"]["state"] == "done"
    assert (layout.images / "file-in-the-way").read_text() == "a file, not a folder"
    check_invariants(layout.root)


def test_a_lock_file_planted_as_a_symlink_is_not_written_through(tmp_path):
    """The run folder's .lock is opened, truncated and written with the pid by every run: a
    symlink planted in its place must not make that happen to a file outside the folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "precious.txt"
    victim.write_text("do not truncate me")
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    layout.lock.symlink_to(victim)
    try:
        with RunLock(layout.lock):
            pass
    except ConfigError as exc:  # refusing is fine, with a clear line
        assert ".lock" in str(exc)
    assert victim.read_text() == "do not truncate me"
