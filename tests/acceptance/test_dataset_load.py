"""A dataset user's view: `datasets.load_dataset("imagefolder")` on a run's images/ folder."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.support import run_cli

datasets = pytest.importorskip("datasets")


def test_images_folder_loads_as_a_hugging_face_imagefolder(tmp_path, monkeypatch):
    m = tmp_path / "set.jsonl"
    rows = [
        {
            "id": f"img-{i}",
            "prompt": f"a watercolor of lighthouse number {i}",
            "size": "512*512",
            "seed": i,
            "split_name": "a" if i % 2 else "b",
        }
        for i in range(6)
    ]
    rows.append({"id": "中文-1", "prompt": "一只在雪地里奔跑的柴犬", "size": "512*512", "seed": 9})
    m.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    out = tmp_path / "out"
    r = run_cli(
        "run",
        m,
        "--out",
        out,
        "--emulate",
        "--emulate-latency",
        "0",
        "--emulate-rps",
        "1000",
        "--rps",
        "1000",
        "--start-rps",
        "1000",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ds = datasets.load_dataset(
        "imagefolder", data_dir=str(out / "images"), split="train", cache_dir=str(tmp_path / "c")
    )
    assert len(ds) == 7
    by_id = {row["id"]: row for row in ds}
    assert by_id["中文-1"]["prompt"] == "一只在雪地里奔跑的柴犬"
    assert by_id["img-3"]["seed"] == 3
    img = by_id["img-3"]["image"]
    assert img.size == (512, 512)


def _emulated_run(manifest, out, *extra):
    return run_cli(
        "run", manifest, "--out", out, "--emulate", "--emulate-latency", "0",
        "--emulate-rps", "1000", "--rps", "1000", "--start-rps", "1000", "--no-progress",
        *extra,
    )  # fmt: skip


def _load(monkeypatch, tmp_path, kind, **kw):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cache = tmp_path / f"cache-{kind}-{len(list(tmp_path.iterdir()))}"
    return datasets.load_dataset(kind, cache_dir=str(cache), **kw)


def test_flat_layout_gives_every_extra_column_typed_as_written(tmp_path, monkeypatch):
    m = tmp_path / "flat.jsonl"
    rows = [
        {"id": f"f{i}", "prompt": f"a fox number {i}", "size": "512*512", "seed": i,
         "label": i % 2, "score": i / 4, "style": "oil" if i % 2 else "水彩"}
        for i in range(4)
    ]  # fmt: skip
    m.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    r = _emulated_run(m, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    ds = _load(monkeypatch, tmp_path, "imagefolder", data_dir=str(tmp_path / "out" / "images"))
    assert list(ds) == ["train"]
    got = {row["id"]: row for row in ds["train"]}
    assert set(got) == {"f0", "f1", "f2", "f3"}
    assert got["f3"]["label"] == 1 and isinstance(got["f3"]["label"], int)
    assert got["f3"]["score"] == 0.75
    assert got["f2"]["style"] == "水彩"
    assert got["f2"]["prompt"] == "a fox number 2" and got["f2"]["seed"] == 2
    assert got["f1"]["image"].size == (512, 512)


OUT = "{split}/{label}/{id}.png"


def test_split_layout_gives_each_split_with_prompts_and_columns(tmp_path, monkeypatch):
    m = tmp_path / "ds.csv"
    m.write_text(
        "id,prompt,size,seed,split,label,output\n"
        + "".join(
            f"s{i},a {label} in the snow,512*512,{i},{split},{label},{OUT}\n"
            for i, (split, label) in enumerate(
                [("train", "cat"), ("train", "dog"), ("train", "cat"), ("test", "dog"),
                 ("validation", "cat")]
            )
        ),
        "utf-8",
    )  # fmt: skip
    out = tmp_path / "out"
    r = _emulated_run(m, out)
    assert r.returncode == 0, r.stderr
    images = out / "images"
    assert not (images / "metadata.jsonl").exists()  # every image is under a split folder
    first = json.loads((images / "train" / "metadata.jsonl").read_text().splitlines()[0])
    assert first["file_name"] == "cat/s0.png"
    ds = _load(monkeypatch, tmp_path, "imagefolder", data_dir=str(images))
    assert sorted(ds) == ["test", "train", "validation"]
    assert [len(ds[s]) for s in ("train", "test", "validation")] == [3, 1, 1]
    row = ds["test"][0]
    assert (row["id"], row["prompt"], row["seed"], row["label"]) == (
        "s3",
        "a dog in the snow",
        3,
        "dog",
    )
    assert row["split"] == "test"
    assert row["image"].size == (512, 512)


@pytest.mark.serial  # a race: killed before it has finished
def test_metadata_is_appended_during_the_run_and_completed_after_kill_9(tmp_path):
    import signal
    import subprocess
    import time

    from tests.support import batcher_cmd

    m = tmp_path / "slow.csv"
    m.write_text(
        "id,prompt,size,split,output\n"
        + "".join(f"k{i},a kite {i},512*512,train,{{split}}/{{id}}.png\n" for i in range(40))
    )
    out = tmp_path / "out"
    meta = out / "images" / "train" / "metadata.jsonl"
    args = [
        "run", m, "--out", out, "--emulate", "--emulate-latency", "200", "--emulate-rps", "1000",
        "--rps", "20", "--start-rps", "20", "--concurrency", "4", "--no-progress",
    ]  # fmt: skip
    quiet = subprocess.DEVNULL
    proc = subprocess.Popen(batcher_cmd(*args), stdout=quiet, stderr=quiet)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if meta.is_file() and len(meta.read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("metadata.jsonl did not grow during the run")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    lines = meta.read_text().splitlines()
    assert 5 <= len(lines) < 40, "the run finished before the kill; nothing was tested"
    ids = [json.loads(line)["id"] for line in lines]  # every line parses
    assert len(set(ids)) == len(ids)
    r = _emulated_run(m, out)
    # A job whose image URL came from the killed process's own emulator is generated again
    # (that emulator is gone); every done job is listed, once.
    assert r.returncode == 0, r.stderr
    ids = [json.loads(line)["id"] for line in meta.read_text().splitlines()]
    con = sqlite3.connect(out / "batcher.db")
    try:
        done = [row[0] for row in con.execute("SELECT id FROM jobs WHERE state = 'done'")]
    finally:
        con.close()
    assert len(done) == 40
    assert sorted(ids) == sorted(done)


def test_a_label_edited_after_the_run_is_in_the_metadata_without_a_new_image(tmp_path):
    m = tmp_path / "labels.csv"
    m.write_text(
        "id,prompt,size,split,label,output\n"
        "a,a red kite,512*512,train,kite,{split}/{id}.png\n"
        "b,a blue boat,512*512,test,boat,{split}/{id}.png\n"
    )
    out = tmp_path / "out"
    r = _emulated_run(m, out, "--json")
    assert r.returncode == 0, r.stderr
    before = (out / "images" / "train" / "a.png").read_bytes()
    m.write_text(m.read_text().replace(",kite,", ",sky toy,"))
    r = _emulated_run(m, out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["this_run"]["calls"] == 0  # nothing generated again
    line = json.loads((out / "images" / "train" / "metadata.jsonl").read_text())
    assert (line["id"], line["label"]) == ("a", "sky toy")
    assert (out / "images" / "train" / "a.png").read_bytes() == before


def test_a_text_column_one_split_lacks_still_loads(tmp_path, monkeypatch):
    m = tmp_path / "sparse.jsonl"
    rows = [
        {"id": "a", "prompt": "a cat", "note": "blurry", "output": "train/{id}.png"},
        {"id": "b", "prompt": "a dog", "output": "test/{id}.png"},
    ]
    for row in rows:
        row["size"] = "512*512"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = _emulated_run(m, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    ds = _load(monkeypatch, tmp_path, "imagefolder", data_dir=str(tmp_path / "out" / "images"))
    assert (ds["train"][0]["note"], ds["test"][0]["note"]) == ("blurry", "")


def test_a_rehearsal_regenerates_an_image_whose_url_came_from_an_earlier_emulator(tmp_path):
    """Each rehearsal starts its own emulator on a new port: an image generated by an earlier
    one (a crash between generation and download) can only be made again, never downloaded."""
    m = tmp_path / "two.csv"
    m.write_text("id,prompt,size\na,a red kite,512*512\nb,a blue kite,512*512\n")
    out = tmp_path / "out"
    assert _emulated_run(m, out).returncode == 0
    con = sqlite3.connect(out / "batcher.db")
    try:  # as a kill -9 after generation leaves it: generated, not yet downloaded
        con.execute(
            "UPDATE jobs SET state = 'generated', sha256 = NULL, bytes = NULL, "
            "finished_at = NULL WHERE id = 'a'"
        )
        con.commit()
        (out / "images" / "a.png").unlink()
    finally:
        con.close()
    r = _emulated_run(m, out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["this_run"]["regenerated"] == 1
    assert (out / "images" / "a.png").is_file()
