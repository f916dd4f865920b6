"""``n``, images a job makes: read from every manifest format, checked per model, and the pure
rules that follow from it (file names, the shortfall note, one dataset row per image)."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import batcher.records
import jobs.naming
from batcher.modelrules import RULES
from batcher.models import MODELS
from batcher.pool import shortfall_note
from batcher.records import export_row, image_records, metadata_row
from jobs.errors import ManifestInvalid
from jobs.manifest import open_manifest
from jobs.naming import MAX_COMPONENT_BYTES, image_output


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def read(path: Path) -> dict[str, int]:
    return {spec.id: spec.n for spec in open_manifest(path, rules=RULES)}


def error(path: Path) -> str:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    text = info.value.errors[0].format()
    return text[len(str(path.parent)) + 1 :]


def test_n_comes_from_yaml_defaults_a_job_csv_and_jsonl_and_defaults_to_1(tmp_path: Path) -> None:
    yaml = write(
        tmp_path,
        "m.yaml",
        "defaults:\n  model: wan2.2-t2i-flash\n  n: 3\njobs:\n"
        "  - {id: a, prompt: x}\n  - {id: b, prompt: y, n: 4}\n"
        "  - {id: c, prompt: z, model: qwen-image, n: 1}\n",
    )
    assert read(yaml) == {"a": 3, "b": 4, "c": 1}
    csv = write(
        tmp_path, "m.csv", "id,prompt,model,n\na,x,wan2.5-t2i-preview,2\nb,y,z-image-turbo,\n"
    )
    assert read(csv) == {"a": 2, "b": 1}
    jsonl = write(
        tmp_path,
        "m.jsonl",
        '{"id": "a", "prompt": "x", "model": "wanx2.1-t2i-turbo", "n": 4}\n'
        '{"id": "b", "prompt": "y"}\n',
    )
    assert read(jsonl) == {"a": 4, "b": 1}


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "m.yaml",
            "defaults:\n  model: wan2.2-t2i-plus\n  n: 5\njobs:\n  - {id: a, prompt: x}\n",
            "m.yaml:3: n: 5 is outside 1..4 for wan2.2-t2i-plus (it makes 1 to 4 images a call)",
        ),
        (
            "m.yaml",
            "jobs:\n  - id: a\n    prompt: x\n    model: qwen-image-max\n    n: 2\n",
            "m.yaml:5: n: qwen-image-max makes 1 image a call, not 2 (several images a call: wan",
        ),
        (
            "m.jsonl",
            '{"id": "a", "prompt": "x", "model": "wan2.2-t2i-flash", "n": 0}\n',
            "m.jsonl:1: n: 0 is outside 1..4 for wan2.2-t2i-flash",
        ),
        (
            "m.csv",
            "id,prompt,n\na,x,3\n",
            "m.csv:2: n: z-image-turbo makes 1 image a call, not 3",
        ),
    ],
)
def test_n_outside_the_models_range_names_the_file_line_and_range(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    assert error(write(tmp_path, name, text)).startswith(expected)


def test_every_model_with_several_images_a_call_takes_each_n_of_its_range() -> None:
    for entry in MODELS.values():
        for n in range(entry.n_min, entry.n_max + 1):
            assert RULES.param_problems(entry.name, n=n, negative_prompt=None, watermark=None) == []
        bad = RULES.param_problems(
            entry.name, n=entry.n_max + 1, negative_prompt=None, watermark=None
        )
        assert [field for field, _ in bad] == ["n"]


def test_image_file_names() -> None:
    assert image_output("a/b.png", 1, 1) == "a/b.png"
    assert image_output("a/b.png", 3, 4) == "a/b-3.png"
    assert image_output("b.PNG", 2, 2) == "b-2.PNG"
    long = "x" * (MAX_COMPONENT_BYTES - 4) + ".png"
    named = image_output(f"d/{long}", 4, 4)
    assert named.startswith("d/x") and named.endswith("-4.png")
    assert len(named.split("/")[-1].encode()) <= MAX_COMPONENT_BYTES
    assert doctest.testmod(jobs.naming).failed == 0


def test_the_shortfall_note() -> None:
    assert shortfall_note(2, 2, []) is None
    failed = [
        ("InternalError.Algo", "Inference error."),
        ("InternalError.Algo", "Inference error."),
    ]
    assert shortfall_note(4, 2, failed) == (
        "2 of 4 images failed: InternalError.Algo: Inference error."
    )
    assert shortfall_note(4, 3, []) == "1 of 4 images did not come (the answer listed 3)"


REC = {
    "id": "lamp",
    "state": "done",
    "model": "wan2.2-t2i-flash",
    "prompt": "p",
    "size": "512*512",
    "seed": 7,
    "n": 3,
    "params": '{"negative_prompt":"blurry","watermark":true}',
    "prompt_extend": False,
    "output": "train/lamp.png",
    "request_id": "r",
    "width": 512,
    "height": 512,
    "sha256": "a" * 64,
    "bytes": 10,
    "actual_prompt": None,
    "generated_at": 1.0,
    "vars": None,
    "images": [
        {"index": 1, "sha256": "a" * 64, "bytes": 10, "width": 512, "height": 512},
        {"index": 3, "sha256": "c" * 64, "bytes": 30, "width": 512, "height": 512},
    ],
}


def test_a_done_job_of_several_images_is_a_row_per_image_with_its_parameters() -> None:
    rows = image_records(dict(REC))
    assert [(r["output"], r["image_index"], r["bytes"]) for r in rows] == [
        ("train/lamp-1.png", 1, 10),
        ("train/lamp-3.png", 3, 30),
    ]
    meta = metadata_row(rows[1], "lamp-3.png", [])
    assert (meta["model"], meta["n"], meta["negative_prompt"], meta["watermark"]) == (
        "wan2.2-t2i-flash",
        3,
        "blurry",
        True,
    )
    assert (meta["image_index"], meta["sha256"]) == (3, "c" * 64)
    out = export_row(rows[1], [])
    assert (out["file"], out["image_index"], out["n"], out["watermark"]) == (
        "images/train/lamp-3.png",
        3,
        3,
        True,
    )
    # a job not done yet is one row, whatever its n
    assert len(image_records({**REC, "state": "failed"})) == 1
    one = image_records({**REC, "n": 1, "images": None, "params": None})
    assert one[0]["output"] == "train/lamp.png" and one[0]["image_index"] == 1
    assert metadata_row(one[0], "lamp.png", [])["watermark"] is False
    assert doctest.testmod(batcher.records).failed == 0


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            "a,x,wan2.2-t2i-flash,3,shop/cat.png\nb,y,z-image-turbo,1,shop/Cat-2.png\n",
            "m.csv:3: output: 'shop/Cat-2.png' collides with line 2: a job of n > 1 images "
            "writes <stem>-1.png .. <stem>-n.png, and both would write shop/cat-2.png",
        ),
        (
            "b,y,z-image-turbo,1,shop/cat-4.png\na,x,wan2.5-t2i-preview,4,shop/cat.png\n",
            "m.csv:3: output: 'shop/cat.png' collides with line 2: a job of n > 1 images "
            "writes <stem>-1.png .. <stem>-n.png, and both would write shop/cat-4.png",
        ),
    ],
)
def test_a_row_writing_a_file_of_a_job_of_several_images_is_refused(
    tmp_path: Path, rows: str, expected: str
) -> None:
    path = write(tmp_path, "m.csv", "id,prompt,model,n,output\n" + rows)
    assert error(path) == expected


def test_jobs_of_several_images_with_other_stems_do_not_collide(tmp_path: Path) -> None:
    rows = (
        "a,x,wan2.2-t2i-flash,3,shop/cat.png\n"
        "c,z,wan2.2-t2i-flash,2,shop/cat-3.png\n"  # writes cat-3-1.png, cat-3-2.png
        "d,w,z-image-turbo,1,shop/cat-5.png\n"
        "e,v,wan2.2-t2i-flash,2,shop/dog-2.png\n"  # writes dog-2-1.png, dog-2-2.png
        "f,u,wan2.2-t2i-flash,3,shop/dog.png\n"  # writes dog-1.png .. dog-3.png
    )
    path = write(tmp_path, "m.csv", "id,prompt,model,n,output\n" + rows)
    assert read(path) == {"a": 3, "c": 2, "d": 1, "e": 2, "f": 3}
