"""The hostile corpus: every broken manifest fails with one located line.

``tests/data/bad_manifests/expected.json`` maps each file to the line, field and message
fragment of its first error; the CLI test runs the same corpus through ``batcher plan``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.errors import ManifestInvalid
from jobs.manifest import open_manifest

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad_manifests"
EXPECTED: dict[str, dict[str, object]] = json.loads(
    (CORPUS / "expected.json").read_text(encoding="utf-8")
)


def test_the_corpus_is_complete_and_broad() -> None:
    files = {p.name for p in CORPUS.iterdir() if not p.name.startswith(".")} - {"expected.json"}
    assert files == set(EXPECTED)
    assert len(files) >= 30
    for kind in (".yaml", ".csv", ".jsonl"):
        assert sum(name.endswith(kind) for name in files) >= 10
    for entry in EXPECTED.values():
        assert set(entry) == {"line", "field", "contains"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_broken_manifest_fails_with_a_located_one_line_error(name: str) -> None:
    expected = EXPECTED[name]
    path = CORPUS / name
    produced = []
    with pytest.raises(ManifestInvalid) as info:
        for spec in open_manifest(path):
            produced.append(spec)
    first = info.value.errors[0]
    assert (first.line, first.field) == (expected["line"], expected["field"]), first.format()
    assert str(expected["contains"]) in first.message, first.format()
    assert first.path == str(path)
    for error in info.value.errors:
        text = error.format()
        assert "\n" not in text and "\r" not in text
        assert text.startswith(f"{path}:" if error.line is not None else f"{path}: ")
        assert "Traceback" not in text
