"""YAML manifests: safe loading, located fields, defaults and the matrix."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs import yamlfile
from jobs.errors import ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.spec import JobSpec


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def specs(path: Path) -> list[JobSpec]:
    return list(open_manifest(path, rules=RULES))


def errors(path: Path) -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    return info.value.errors


CATALOG = """\
model: z-image-turbo
output: "{category}/{id}-{style}-{seed}.png"
defaults:
  size: "1:1"
  vars: {category: shoes}
matrix:
  style: [studio, lifestyle]
  seed: [1, 2]
jobs:
  - id: sku-001
    prompt: A {style} photo of a shoe
  - id: 鞋-002
    prompt: 一双{style}风格的鞋
    size: 16:9
    vars: {category: 鞋}
"""


def test_the_matrix_fans_each_job_out_in_key_order(tmp_path: Path) -> None:
    got = specs(write(tmp_path, CATALOG))
    assert [s.id for s in got] == [
        "sku-001-studio-1",
        "sku-001-studio-2",
        "sku-001-lifestyle-1",
        "sku-001-lifestyle-2",
        "鞋-002-studio-1",
        "鞋-002-studio-2",
        "鞋-002-lifestyle-1",
        "鞋-002-lifestyle-2",
    ]
    assert [s.seed for s in got[:4]] == [1, 2, 1, 2]
    assert got[0].output == "shoes/sku-001-studio-1.png"  # {id} is the id the job wrote
    assert got[1].output == "shoes/sku-001-studio-2.png"
    assert got[4].output == "鞋/鞋-002-studio-1.png"
    assert got[4].size == "1536*864" and got[0].size == "1280*1280"
    assert got[2].prompt == "A lifestyle photo of a shoe"
    assert {s.line for s in got} == {10, 12}


def test_two_combinations_with_one_output_collide_on_the_same_line(tmp_path: Path) -> None:
    # Without {seed}, seeds 1 and 2 of one style would share a file.
    found = errors(write(tmp_path, CATALOG.replace("-{seed}.png", ".png")))
    assert found[0].field == "output"
    assert "collides with line 10 (another combination of the matrix" in found[0].message


def test_without_an_output_template_files_are_named_after_the_full_id(tmp_path: Path) -> None:
    got = specs(
        write(
            tmp_path,
            "matrix:\n  style: [a, b]\n  prompt_extend: [true, false]\n"
            "jobs:\n  - id: x\n    prompt: '{style} {prompt_extend}'\n",
        )
    )
    assert [s.output for s in got] == [
        "x-a-true.png",
        "x-a-false.png",
        "x-b-true.png",
        "x-b-false.png",
    ]
    assert [s.prompt_extend for s in got] == [True, False, True, False]
    assert got[0].prompt == "a true"


def test_matrix_seeds_and_sizes_set_the_fields(tmp_path: Path) -> None:
    got = specs(
        write(
            tmp_path,
            "matrix:\n  size: [1:1, '16:9@1024']\n  seed: [7]\njobs:\n  - id: x\n    prompt: p\n",
        )
    )
    assert [(s.id, s.size, s.seed) for s in got] == [
        ("x-1:1-7", "1280*1280", 7),
        ("x-16:9@1024-7", "1280*720", 7),
    ]
    assert [s.output for s in got] == ["x-1_1-7.png", "x-16_9@1024-7.png"]


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        (
            "matrix:\n  seed: [1, 2]\njobs:\n  - id: a\n    prompt: p\n    seed: 5\n",
            6,
            "seed",
            "also set by the matrix",
        ),
        (
            "matrix:\n  style: [x]\njobs:\n  - id: a\n    prompt: p\n    vars: {style: y}\n",
            6,
            "vars.style",
            "also a matrix key",
        ),
        (
            "matrix:\n  prompt: [a, b]\njobs:\n  - prompt: p\n",
            2,
            "matrix.prompt",
            "a matrix varies",
        ),
        ("matrix:\n  index: [1]\njobs:\n  - prompt: p\n", 2, "matrix.index", "a matrix varies"),
        ("matrix:\n  style: []\njobs:\n  - prompt: p\n", 2, "matrix.style", "empty list"),
        ("matrix:\n  style: [a, a]\njobs:\n  - prompt: p\n", 2, "matrix.style", "listed twice"),
        ("matrix:\n  style: [[a]]\njobs:\n  - prompt: p\n", 2, "matrix.style", "single value"),
        ("matrix:\n  seed: [-1]\njobs:\n  - prompt: p\n", 2, "matrix.seed", "outside 0..2147"),
        ("matrix:\n  seed: [x]\njobs:\n  - prompt: p\n", 2, "matrix.seed", "whole number"),
        ("matrix:\n  style: [~]\njobs:\n  - prompt: p\n", 2, "matrix.style", "string, number"),
        ("matrix: [1, 2]\njobs:\n  - prompt: p\n", 1, "matrix", "expected a mapping"),
    ],
)
def test_matrix_mistakes_are_located(
    tmp_path: Path, text: str, line: int, field: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    error = info.value.errors[0]
    assert (error.line, error.field) == (line, field)
    assert message in error.message


def test_too_many_combinations_are_refused_on_open(tmp_path: Path) -> None:
    values = "[" + ", ".join(str(i) for i in range(101)) + "]"
    text = "matrix:\n" + "".join(f"  k{n}: {values}\n" for n in range(3)) + "jobs:\n  - prompt: p\n"
    with pytest.raises(ManifestInvalid) as info:
        open_manifest(write(tmp_path, text), rules=RULES)
    assert "1030301 combinations; at most 1000000" in info.value.errors[0].message


def test_defaults_apply_and_jobs_override_them(tmp_path: Path) -> None:
    got = specs(
        write(
            tmp_path,
            "defaults:\n  size: 4:3\n  seed: 5\n  prompt_extend: true\n  vars: {a: x, b: y}\n"
            "jobs:\n"
            "  - id: one\n    prompt: '{a}{b}'\n"
            "  - id: two\n    prompt: '{a}{b}'\n    size: 1:1\n    seed: ~\n"
            "    prompt_extend: false\n    vars: {b: z}\n",
        )
    )
    one, two = got
    assert (one.size, one.seed, one.prompt_extend, one.prompt) == ("1472*1104", 5, True, "xy")
    assert (two.size, two.seed, two.prompt_extend, two.prompt) == ("1280*1280", 5, False, "xz")


@pytest.mark.parametrize(
    ("text", "line", "field", "message"),
    [
        ("defaults:\n  id: x\njobs:\n  - prompt: p\n", 2, "id", "cannot have a default"),
        ("defaults:\n  sise: 1:1\njobs:\n  - prompt: p\n", 2, "sise", "did you mean size?"),
        ("defaults: [1]\njobs:\n  - prompt: p\n", 1, "defaults", "expected a mapping"),
        ("promt: x\njobs:\n  - prompt: p\n", 1, "promt", "did you mean prompt? (per-job"),
        ("seed: 1\njobs:\n  - prompt: p\n", 1, "seed", "per-job fields go in jobs:"),
        ("jobz:\n  - prompt: p\n", 1, "jobz", "did you mean jobs?"),
        ("model: dall-e-3\njobs:\n  - prompt: p\n", 1, "model", "unknown model 'dall-e-3'; known"),
        ("jobs: {a: 1}\n", 1, "jobs", "expected a list of jobs"),
        ("output: 5\njobs:\n  - prompt: p\n", 1, "output", "must be a path template"),
        ("jobs:\n  - just a string\n", 2, "job", "expected a mapping"),
        ("jobs:\n  - prompt: p\n    promt: q\n", 3, "promt", "unknown field; did you mean prompt?"),
        ("jobs:\n  - prompt: p\n    Seed: 3\n", 3, "Seed", "did you mean seed?"),
        ("jobs:\n  - prompt: p\n    colour: red\n", 3, "colour", "unknown field"),
        ("jobs:\n  - prompt: p\n    vars: [1]\n", 3, "vars", "expected a mapping"),
        ("jobs:\n  - prompt: p\n    vars: {x: [1]}\n", 3, "vars.x", "single value"),
        ("jobs:\n  - prompt: p\n    vars: {x: ~}\n", 3, "vars.x", "string, number or boolean"),
        ("jobs:\n  - prompt: yes\n", 2, "prompt", "must be text"),
        ("jobs:\n  - prompt: ~\n", 2, "prompt", "missing"),
        ("jobs:\n  - prompt: p\n    id: 1.5\n", 3, "id", "a string or an integer"),
        ("jobs:\n  - prompt: p\n    id: ''\n", 3, "id", "empty"),
        ("jobs:\n  - prompt: p\n    seed: 1.0\n", 3, "seed", "whole number"),
        ("jobs:\n  - prompt: p\n    seed: true\n", 3, "seed", "whole number"),
        ("jobs:\n  - prompt: p\n    prompt_extend: 1\n", 3, "prompt_extend", "true or false"),
        ("jobs:\n  - prompt: p\n    size: [1, 2]\n", 3, "size", "single value"),
        ("jobs:\n  - prompt: p\n    size: 2024-01-01\n", 3, "size", "is not a size"),
        ("jobs:\n  - prompt: p\n    1: x\n", 3, "1", "unknown field"),
        ("jobs:\n  - prompt: p\n    [a]: x\n", 3, "job", "a key must be plain text"),
        ("jobs:\n  - prompt: p\n---\njobs: []\n", 3, "yaml", "expected a single document"),
        ("jobs:\n  - prompt: 'unterminated\n", 3, "yaml", "found unexpected end of stream"),
        ("jobs:\n  - prompt: \x07bell\n", 2, "yaml", "is not allowed in YAML"),
        ("jobs:\n  - prompt: *nowhere\n", 2, "yaml", "found undefined alias"),
    ],
)
def test_structure_and_type_mistakes_are_located(
    tmp_path: Path, text: str, line: int, field: str, message: str
) -> None:
    found = errors(write(tmp_path, text))
    assert (found[0].line, found[0].field) == (line, field), found[0]
    assert message in found[0].message
    assert all("\n" not in e.format() for e in found)


@pytest.mark.parametrize(
    "tagged",
    [
        "!!python/object/apply:os.mkdir [{target}]",
        "!!python/object/new:os.mkdir [{target}]",
        "!!python/object:os.mkdir {{}}",
        "!!python/name:os.mkdir",
        "!!python/module:os",
        "!!binary aGVsbG8=",
        "!custom {target}",
        "!!set {{a: null}}",
    ],
)
def test_no_tag_constructs_anything(tmp_path: Path, tagged: str) -> None:
    target = tmp_path / "pwned"
    value = tagged.format(target=f'"{target}"')
    for text in (
        f"jobs:\n  - prompt: {value}\n",
        f"jobs:\n  - prompt: p\n    vars:\n      x: {value}\n",
        f"jobs: {value}\n",
        f"model: {value}\njobs:\n  - prompt: p\n",
    ):
        with pytest.raises(ManifestInvalid) as info:
            list(open_manifest(write(tmp_path, text), rules=RULES))
        error = info.value.errors[0]
        assert error.line is not None
        assert "tag" in error.message or "!!binary" in error.message or "expected" in error.message
    assert not target.exists()


def test_yaml_1_1_scalars_mean_what_was_written_where_text_is_expected(tmp_path: Path) -> None:
    [spec] = specs(
        write(tmp_path, "jobs:\n  - id: 007\n    prompt: 1984\n    size: 16:9\n    seed: 0x10\n")
    )
    assert (spec.id, spec.prompt, spec.size, spec.seed) == ("007", "1984", "1536*864", 16)


def test_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    got = specs(
        write(
            tmp_path,
            "jobs:\n"
            "  - &first {id: a, prompt: one, size: '3:4', seed: 1}\n"
            "  - <<: *first\n    id: b\n",
        )
    )
    assert [(s.id, s.prompt, s.size, s.seed) for s in got] == [
        ("a", "one", "1104*1472", 1),
        ("b", "one", "1104*1472", 1),
    ]


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    [error] = errors(write(tmp_path, "jobs:\n  - id: a\n    prompt: x\n    prompt: y\n"))
    assert error.format().endswith("m.yaml:4: prompt: duplicate key (first on line 3)")


def test_merge_keys_survive_reading_twice(tmp_path: Path) -> None:
    # Merges rewrite nodes; a second read (or the duplicate check's re-read) must agree.
    path = write(
        tmp_path,
        "jobs:\n"
        "  - &base {id: a, prompt: one, size: '3:4'}\n"
        "  - {<<: *base, id: b}\n"
        "  - {<<: *base, id: c}\n"
        "  - {<<: *base, id: b}\n",
    )
    manifest = open_manifest(path, rules=RULES)
    for _ in range(2):
        with pytest.raises(ManifestInvalid) as info:
            list(manifest)
        assert [(e.line, e.message) for e in info.value.errors] == [
            (5, "duplicate id 'b'; also on line 3")
        ]


def test_a_bad_merge_is_located(tmp_path: Path) -> None:
    [error] = errors(write(tmp_path, "jobs:\n  - <<: [1, 2]\n    prompt: p\n"))
    assert (error.line, error.field) == (2, "<<")


def test_model_defaults_and_is_reported(tmp_path: Path) -> None:
    assert (
        open_manifest(write(tmp_path, "jobs:\n  - prompt: p\n"), rules=RULES).model
        == "z-image-turbo"
    )
    manifest = open_manifest(
        write(tmp_path, "model: z-image-turbo\njobs:\n  - prompt: p\n"), rules=RULES
    )
    assert (manifest.model, manifest.format) == ("z-image-turbo", "yaml")


def test_top_level_problems_are_raised_on_open(tmp_path: Path) -> None:
    with pytest.raises(ManifestInvalid) as info:
        open_manifest(
            write(tmp_path, "model: wan2.5\nextra: 1\njobs:\n  - prompt: p\n"), rules=RULES
        )
    assert [(e.line, e.field) for e in info.value.errors] == [(1, "model"), (2, "extra")]


def test_a_huge_yaml_file_is_refused_without_reading_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(yamlfile, "MAX_YAML_BYTES", 100)
    with pytest.raises(ManifestInvalid, match="over 50 MiB"):
        open_manifest(write(tmp_path, "jobs:\n" + "  - prompt: p\n" * 20), rules=RULES)


def test_job_lines_are_the_jobs_own(tmp_path: Path) -> None:
    got = specs(
        write(tmp_path, "# head\njobs:\n\n  - id: a\n    prompt: p\n  - {id: b, prompt: q}\n")
    )
    assert [s.line for s in got] == [4, 6]


def test_a_deeply_nested_document_is_an_error_not_a_crash(tmp_path: Path) -> None:
    found = errors(write(tmp_path, "jobs: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert found[0].field in ("yaml", "jobs")
