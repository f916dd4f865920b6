"""A dataset user's view: `datasets.load_dataset("imagefolder")` on a run's images/ folder."""

from __future__ import annotations

import json

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
