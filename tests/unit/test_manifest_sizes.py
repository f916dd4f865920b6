"""Sizes: W*H, WxH and the recommended aspect-ratio table, within the API's pixel limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.errors import ManifestInvalid
from jobs.manifest import open_manifest
from jobs.sizes import DEFAULT_SIZE, RECOMMENDED, TIERS, parse_size

TABLE = [
    (ratio, tier, sizes[i]) for ratio, sizes in RECOMMENDED.items() for i, tier in enumerate(TIERS)
]


@pytest.mark.parametrize(("ratio", "tier", "expected"), TABLE)
def test_every_ratio_and_tier_resolves_to_the_table(ratio: str, tier: str, expected: str) -> None:
    assert parse_size(f"{ratio}@{tier}") == expected


@pytest.mark.parametrize("ratio", list(RECOMMENDED))
def test_a_ratio_without_tier_is_the_1280_tier(ratio: str) -> None:
    assert parse_size(ratio) == RECOMMENDED[ratio][1]


def test_the_table_matches_the_reference_document() -> None:
    # the service's documented size table, spot checks across it
    assert RECOMMENDED["16:9"] == ("1280*720", "1536*864", "2048*1152")
    assert RECOMMENDED["9:21"] == ("576*1344", "720*1680", "864*2016")
    assert RECOMMENDED["7:9"] == ("896*1152", "1120*1440", "1344*1728")
    assert len(RECOMMENDED) == 11


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024*1536", "1024*1536"),
        ("1024x1536", "1024*1536"),
        ("1024X1536", "1024*1536"),
        ("1024×1536", "1024*1536"),
        (" 1024 * 1536 ", "1024*1536"),
        ("01024*1024", "1024*1024"),
        ("512*512", "512*512"),
        ("2048*2048", "2048*2048"),
        ("16384*16", "16384*16"),  # no aspect-ratio rule is documented
        (" 16 : 9 @ 1536 ", "2048*1152"),
    ],
)
def test_pixel_sizes_are_normalised(text: str, expected: str) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4096*4096", "4096*4096 is outside 512*512..2048*2048 total pixels"),
        ("511*512", "511*512 is outside 512*512..2048*2048 total pixels"),
        ("2049*2048", "is outside"),
        ("0*1024", "must be positive"),
        ("5:4", "5:4 is not a recommended aspect ratio"),
        ("16:10@1280", "not a recommended aspect ratio"),
        ("16:9@2048", "@2048: the pixel tier must be @1024, @1280 or @1536"),
        ("huge", "'huge' is not a size"),
        ("", "is not a size"),
        ("1024*", "is not a size"),
        ("-1024*1024", "is not a size"),
        ("1024.0*1024", "is not a size"),
        ("١٠٢٤*١٠٢٤", "is not a size"),  # Arabic-Indic digits are not the API's digits
    ],
)
def test_bad_sizes_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_absent_size_is_the_api_default_stored_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("id,prompt\na,hello\n", encoding="utf-8")
    [spec] = list(open_manifest(path))
    assert spec.size == DEFAULT_SIZE == "1024*1536"
    assert (spec.width, spec.height) == (1024, 1536)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("16:9", "1536*864"),  # YAML 1.1 would read this as the base-60 integer 969
        ("1:1", "1280*1280"),
        ("9:16@1024", "720*1280"),
        ("'3:4'", "1104*1472"),
        ("1024x1024", "1024*1024"),
    ],
)
def test_yaml_sizes_mean_what_was_written(tmp_path: Path, written: str, expected: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(f"jobs:\n  - id: a\n    prompt: hi\n    size: {written}\n", encoding="utf-8")
    [spec] = list(open_manifest(path))
    assert spec.size == expected


def test_a_size_error_names_the_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "jobs:\n  - id: a\n    prompt: hi\n  - id: b\n    prompt: big\n    size: 4096*4096\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path))
    assert info.value.errors[0].format() == (
        f"{path}:6: size: 4096*4096 is outside 512*512..2048*2048 total pixels"
    )


def test_matrix_sizes_are_checked_where_they_are_written(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "matrix:\n  size: [1:1, 5:4]\njobs:\n  - id: a\n    prompt: hi\n", encoding="utf-8"
    )
    with pytest.raises(ManifestInvalid) as info:
        open_manifest(path)
    [error] = info.value.errors
    assert (error.line, error.field) == (2, "matrix.size")
    assert "5:4 is not a recommended aspect ratio" in error.message
