"""``batcher plan`` after a first import gives its figures from the import's own counts (no
scan of the table): they must be the figures a scan gives. Each case plans a manifest into a
new folder, then plans it again (the manifest unchanged: every figure read from the table) and
into a folder that held part of it (a merge: read from the table too), through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jobs.manifest import HELPER_MIN_BYTES
from tests.pgsupport import fresh
from tests.support import run_cli

# Fan-out of every kind: a matrix, variants, a job of several images, three models, and
# prompt_extend on and off.
YAML = """\
model: z-image-turbo
output: "{model}/{id}-{style}.png"
matrix:
  style: [a, b, c]
jobs:
  - id: one
    prompt: first {style}
    variants: 2
  - id: two
    prompt: second {style}
    prompt_extend: true
  - id: three
    model: wan2.2-t2i-flash
    n: 3
    prompt: third {style}
  - id: four
    model: qwen-image
    prompt: fourth {style}
"""


def plan(manifest: Path, out: Path, *extra: str | Path) -> dict[str, Any]:
    done = run_cli("plan", manifest, "--out", out, "--json", *extra)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Everything about the table, not about what this import did."""
    return {k: v for k, v in result.items() if k not in ("new", "unchanged", "run_folder")}


def test_a_first_plan_counts_as_the_table_does(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(YAML, encoding="utf-8")
    first = plan(manifest, tmp_path / "out")
    assert (first["new"], first["total"], first["pending"]) == (15, 15, 15)
    assert (first["to_generate"], first["calls_to_make"]) == (21, 15)  # three calls of 3 images
    assert {m: v["to_generate"] for m, v in first["models"].items()} == {
        "qwen-image": 3,
        "wan2.2-t2i-flash": 9,
        "z-image-turbo": 9,
    }
    again = plan(manifest, tmp_path / "out")  # unchanged: counted over the table
    assert (again["new"], again["unchanged"]) == (0, 15)
    assert figures(again) == figures(first)
    text_first = run_cli("plan", manifest, "--out", tmp_path / "text")
    text_again = run_cli("plan", manifest, "--out", tmp_path / "text")
    assert text_first.stdout.splitlines()[1:] == text_again.stdout.splitlines()[1:]

    # A folder that held part of the manifest: the import merges, and plan reads the table.
    part = tmp_path / "part.yaml"
    part.write_text(YAML.split("  - id: three")[0], encoding="utf-8")
    assert plan(part, tmp_path / "merged")["total"] == 9
    merged = plan(manifest, tmp_path / "merged")
    assert (merged["new"], merged["unchanged"]) == (6, 9)
    assert figures(merged) == figures(first)


def test_a_first_plan_into_postgresql_counts_as_the_table_does(tmp_path: Path) -> None:
    """The same on PostgreSQL: the rows counted as the COPY sends them, against a plan of the
    unchanged manifest and of a table that held part of it (both read from the table)."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(YAML, encoding="utf-8")
    url = fresh()
    first = plan(manifest, tmp_path / "out", "--db", url)
    assert (first["new"], first["to_generate"], first["calls_to_make"]) == (15, 21, 15)
    again = plan(manifest, tmp_path / "out", "--db", url)
    assert (again["new"], again["unchanged"]) == (0, 15)
    assert figures(again) == figures(first)
    part = tmp_path / "part.yaml"
    part.write_text(YAML.split("  - id: three")[0], encoding="utf-8")
    url = fresh()
    assert plan(part, tmp_path / "merged", "--db", url)["total"] == 9
    merged = plan(manifest, tmp_path / "merged", "--db", url)
    assert (merged["new"], merged["unchanged"]) == (6, 9)
    assert figures(merged) == figures(first)


def test_a_first_plan_of_a_big_mixed_csv_counts_as_the_table_does(tmp_path: Path) -> None:
    """Big enough for the helper process (rows handed over a statement at a time), with the
    model, prompt_extend and n changing within statements and a short last statement."""
    manifest = tmp_path / "big.csv"
    models = ("z-image-turbo", "wan2.2-t2i-flash", "qwen-image")
    lines = ["id,prompt,model,n,prompt_extend"]
    size = i = 0
    while size < HELPER_MIN_BYTES + 1000:
        # the first rows in runs of one model, then a model a row
        model = models[(i // 700) % 3 if i < 50_000 else i % 3]
        n = 1 + i % 4 if model.startswith("wan") else 1
        extend = "true" if i % 5 == 0 else "false"
        lines.append(
            f"job-{i:07d},a studio photo of item {i} on a linen cloth,{model},{n},{extend}"
        )
        size += len(lines[-1]) + 1
        i += 1
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = plan(manifest, tmp_path / "out")
    assert first["new"] == first["total"] == i
    again = plan(manifest, tmp_path / "out")
    assert again["unchanged"] == i
    assert figures(again) == figures(first)
    assert first["to_generate"] > first["calls_to_make"] == i
