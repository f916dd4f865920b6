"""Sizes: W*H, WxH and each model's aspect-ratio table, within that model's limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher.modelrules import RULES
from batcher.models import MODELS, Z_IMAGE_SIZES
from jobs.errors import ManifestInvalid
from jobs.manifest import open_manifest
from jobs.sizes import Pixels, Ratio, read_size

RECOMMENDED = Z_IMAGE_SIZES.ratios
TIERS = Z_IMAGE_SIZES.tiers
TABLE = [
    (ratio, tier, sizes[i]) for ratio, sizes in RECOMMENDED.items() for i, tier in enumerate(TIERS)
]


def parse_size(text: str) -> str:
    return RULES.size("z-image-turbo", text)[0]


@pytest.mark.parametrize(("ratio", "tier", "expected"), TABLE)
def test_every_ratio_and_tier_resolves_to_the_table(ratio: str, tier: str, expected: str) -> None:
    assert parse_size(f"{ratio}@{tier}") == expected


@pytest.mark.parametrize("ratio", list(RECOMMENDED))
def test_a_ratio_without_tier_is_the_1280_tier(ratio: str) -> None:
    assert parse_size(ratio) == RECOMMENDED[ratio][1]


def test_the_table_matches_the_published_one() -> None:
    # spot checks across the z-image-turbo table of recommended sizes
    assert RECOMMENDED["16:9"] == ("1280*720", "1536*864", "2048*1152")
    assert RECOMMENDED["9:21"] == ("576*1344", "720*1680", "864*2016")
    assert RECOMMENDED["7:9"] == ("896*1152", "1120*1440", "1344*1728")
    assert len(RECOMMENDED) == 11


def test_the_syntax_alone_knows_no_model() -> None:
    assert read_size(" 16 : 9 @ 1536 ") == Ratio("16:9", "1536")
    assert read_size("5:4") == Ratio("5:4", None)
    assert read_size("99999*1") == Pixels(99999, 1)


@pytest.mark.parametrize(("model", "ratios"), [(m.name, m.sizes.ratios) for m in MODELS.values()])
def test_every_models_ratio_table_is_within_its_own_limits(model: str, ratios: object) -> None:
    entry = MODELS[model]
    assert entry.sizes.problem(*map(int, entry.sizes.default.split("*"))) is None
    for sizes in entry.sizes.ratios.values():
        assert len(sizes) == len(entry.sizes.tiers)
        for size in sizes:
            assert entry.sizes.problem(*map(int, size.split("*"))) is None, (model, size)


@pytest.mark.parametrize(
    ("model", "written", "expected"),
    [
        ("qwen-image", "16:9", "1664*928"),
        ("qwen-image-max", None, "1328*1328"),
        ("qwen-image-plus", "1104x1472", "1104*1472"),
        ("wan2.2-t2i-flash", None, "1024*1024"),
        ("wan2.2-t2i-flash", "1440*512", "1440*512"),
        ("wan2.5-t2i-preview", "768*2700", "768*2700"),  # the published example
        ("wan2.5-t2i-preview", "9:16", "960*1696"),
        ("wanx2.1-t2i-turbo", "3:4", "864*1152"),
    ],
)
def test_each_model_resolves_its_own_sizes(model: str, written: str | None, expected: str) -> None:
    assert RULES.size(model, written)[0] == expected


@pytest.mark.parametrize(
    ("model", "written", "message"),
    [
        (
            "qwen-image",
            "1024*1536",
            "1024*1536 is not a qwen-image size (one of 1664*928, 1472*1104, 1328*1328, "
            "1104*1472, 928*1664); it suits z-image-turbo",
        ),
        ("wan2.2-t2i-flash", "1536*1536", "each side must be in 512..1440 for wan2.2-t2i-flash"),
        ("wan2.5-t2i-preview", "640*2880", "aspect ratio must be within 1:4..4:1"),
        ("wan2.5-t2i-preview", "512*1024", "it suits z-image-turbo, wan2.2-t2i-flash"),
        ("qwen-image", "7:9", "7:9 is not an aspect ratio qwen-image knows (z-image-turbo has it)"),
        ("qwen-image", "1:1@1536", "@1536: the pixel tier of qwen-image must be @1328"),
    ],
)
def test_a_size_for_another_model_says_so(model: str, written: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        RULES.size(model, written)
    assert message in str(info.value)


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
        ("4096*4096", "4096*4096 is outside 512*512..2048*2048 total pixels for z-image-turbo"),
        ("511*512", "511*512 is outside 512*512..2048*2048 total pixels"),
        ("2049*2048", "is outside"),
        ("0*1024", "must be positive"),
        ("5:4", "5:4 is not an aspect ratio z-image-turbo knows; use one of 1:1, 2:3"),
        ("16:10@1280", "not an aspect ratio z-image-turbo knows"),
        ("16:9@2048", "@2048: the pixel tier of z-image-turbo must be @1024, @1280 or @1536"),
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
    [spec] = list(open_manifest(path, rules=RULES))
    assert spec.size == Z_IMAGE_SIZES.default == "1024*1536"
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
    [spec] = list(open_manifest(path, rules=RULES))
    assert spec.size == expected


def test_a_size_error_names_the_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "jobs:\n  - id: a\n    prompt: hi\n  - id: b\n    prompt: big\n    size: 4096*4096\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    assert info.value.errors[0].format() == (
        f"{path}:6: size: 4096*4096 is outside 512*512..2048*2048 total pixels for z-image-turbo"
    )


def test_matrix_sizes_are_checked_where_they_are_written(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "matrix:\n  size: [1:1, huge]\njobs:\n  - id: a\n    prompt: hi\n", encoding="utf-8"
    )
    with pytest.raises(ManifestInvalid) as info:
        open_manifest(path, rules=RULES)
    [error] = info.value.errors
    assert (error.line, error.field) == (2, "matrix.size")
    assert "'huge' is not a size" in error.message


def test_a_matrix_size_the_jobs_model_refuses_is_named_at_the_job(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "model: qwen-image\nmatrix:\n  size: [1:1, 7:9]\njobs:\n  - id: a\n    prompt: hi\n",
        encoding="utf-8",
    )
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    [error] = info.value.errors
    assert error.field == "size"
    assert "7:9 is not an aspect ratio qwen-image knows" in error.message
