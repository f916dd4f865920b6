"""Several images per row: ``variants: N`` in YAML, CSV and JSONL, and one seed per job of a
row that fans out (variants or a matrix), never one seed copied to all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs.builder import derive_seed
from jobs.errors import ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.spec import JobSpec


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def specs(path: Path) -> list[JobSpec]:
    return list(open_manifest(path, rules=RULES))


def errors(path: Path) -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    return info.value.errors


def test_csv_variants_make_n_jobs_with_ids_seeds_and_outputs_of_their_own(tmp_path):
    m = write(
        tmp_path,
        "m.csv",
        "id,prompt,seed,variants,split,output\n"
        "cat,a cat,100,3,train,{split}/{id}.png\n"
        "dog,a dog,,2,test,{split}/{id}.png\n"
        "owl,an owl,7,,train,{split}/{id}.png\n"
        "emu,an emu,8,1,train,{split}/{id}.png\n",
    )
    got = [(s.id, s.seed, s.output) for s in specs(m)]
    assert got == [
        ("cat-v1", 100, "train/cat-v1.png"),
        ("cat-v2", 101, "train/cat-v2.png"),
        ("cat-v3", 102, "train/cat-v3.png"),
        ("dog-v1", derive_seed("dog-v1"), "test/dog-v1.png"),
        ("dog-v2", derive_seed("dog-v2"), "test/dog-v2.png"),
        ("owl", 7, "train/owl.png"),
        ("emu", 8, "train/emu.png"),
    ]
    assert json.loads(specs(m)[0].vars or "{}") == {"split": "train"}  # not a variable


def test_jsonl_variants_and_the_default_output_name(tmp_path):
    m = write(
        tmp_path,
        "m.jsonl",
        json.dumps({"id": "a.1", "prompt": "p", "variants": 2, "seed": 2147483647}) + "\n"
        + json.dumps({"prompt": "no id", "variants": 2}) + "\n",
    )  # fmt: skip
    got = specs(m)
    assert [(s.id, s.seed, s.output) for s in got[:2]] == [
        ("a.1-v1", 2147483647, "a.1-v1.png"),
        ("a.1-v2", 0, "a.1-v2.png"),  # wraps past the largest seed
    ]
    assert got[2].id.endswith("-v1") and got[3].id.endswith("-v2")
    assert got[2].id[:-3] == got[3].id[:-3] and got[2].seed != got[3].seed


def test_yaml_variants_in_defaults_or_per_job_and_a_job_seed_under_a_matrix(tmp_path):
    m = write(
        tmp_path,
        "m.yaml",
        "defaults: {variants: 2}\n"
        "matrix: {style: [ink, oil]}\n"
        "jobs:\n"
        "  - {id: a, prompt: 'a {style} cat', seed: 10}\n"
        "  - {id: b, prompt: 'a {style} dog', variants: 1, seed: 20}\n",
    )
    got = [(s.id, s.seed) for s in specs(m)]
    assert got == [
        ("a-ink-v1", 10),
        ("a-ink-v2", 11),
        ("a-oil-v1", 12),
        ("a-oil-v2", 13),
        ("b-ink", 20),
        ("b-oil", 21),  # a job seed under a matrix: one seed per combination
    ]


def test_a_matrix_seed_is_each_combinations_first_variant(tmp_path):
    m = write(
        tmp_path,
        "m.yaml",
        "matrix: {seed: [5, 50]}\njobs:\n  - {id: a, prompt: cat, variants: 2}\n",
    )
    assert [(s.id, s.seed) for s in specs(m)] == [
        ("a-5-v1", 5),
        ("a-5-v2", 6),
        ("a-50-v1", 50),
        ("a-50-v2", 51),
    ]


@pytest.mark.parametrize(
    ("name", "text", "line", "field"),
    [
        ("m.csv", "prompt,variants\nok,2\nbad,two\n", 3, "variants"),
        ("m.csv", "prompt,variants\nbad,0\n", 2, "variants"),
        ("m.csv", "prompt,variants\nbad,5000\n", 2, "variants"),
        ("m.jsonl", '{"prompt": "x"}\n{"prompt": "y", "variants": "3"}\n', 2, "variants"),
        ("m.jsonl", '{"prompt": "y", "variants": true}\n', 1, "variants"),
        ("m.yaml", "jobs:\n  - prompt: x\n    variants: -1\n", 3, "variants"),
        ("m.yaml", "defaults:\n  variants: many\njobs:\n  - prompt: x\n", 2, "variants"),
        ("m.yaml", "matrix: {variants: [1, 2]}\njobs:\n  - prompt: x\n", 1, "matrix.variants"),
    ],
)
def test_a_bad_count_is_located(tmp_path, name, text, line, field):
    found = errors(write(tmp_path, name, text))
    assert (found[0].line, found[0].field) == (line, field), found[0].format()
    assert found[0].format().startswith(f"{tmp_path / name}:{line}: {field}: ")
