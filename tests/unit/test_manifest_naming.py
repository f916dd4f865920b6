"""Output paths: relative, inside the output folder, portable, and collision-checked."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.modelrules import RULES
from jobs.errors import ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.naming import MAX_COMPONENT_BYTES, compile_output, safe_component
from jobs.spec import JobSpec


def specs(path: Path) -> list[JobSpec]:
    return list(open_manifest(path, rules=RULES))


def errors(path: Path) -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    return info.value.errors


def render(template: str, **values: str) -> str:
    return compile_output(template).render({"id": "x", **values})[0]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain-id_1", "plain-id_1"),
        ("a/b", "a_b"),
        ("a\\b", "a_b"),
        ('<>:"|?*', "_______"),
        ("tab\there", "tab_here"),
        ("new\nline", "new_line"),
        ("del\x7f", "del_"),
        ("c1\x85", "c1_"),
        ("e\u0301", "é"),  # NFC
        ("鞋/靴", "鞋_靴"),
        ("../..", ".._.."),
    ],
)
def test_a_value_becomes_part_of_one_component(value: str, expected: str) -> None:
    assert safe_component(value) == expected


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("/abs/{id}.png", "is an absolute path; it escapes the output folder"),
        ("/{id}", "absolute path"),
        ("C:/x/{id}.png", "drive letter"),
        ("c:{id}.png", "drive letter"),
        ("a\\{id}.png", "use / between folders"),
        ("\\\\server\\share\\{id}", "use / between folders"),
        ("../{id}.png", "'..' escapes the output folder"),
        ("a/../{id}.png", "'..' escapes"),
        ("./{id}.png", "'.' escapes"),
        ("a/.../{id}", "'...' escapes"),
        ("a//{id}.png", "empty folder or file name"),
        ("{id}/", "empty folder or file name"),
        ("a/ /{id}", "empty folder or file name"),
        ("", "empty folder or file name"),
        ("{id}.jpg", "must end in .png, not .jpg"),
        ("{id}.png.txt", "not .txt"),
        ("metadata.jsonl", "reserved"),
        ("METADATA.JSONL", "reserved"),
        ("{id", "expected '}'"),
        ("{id.__class__}.png", "only plain variable names"),
    ],
)
def test_templates_that_escape_or_mislead_are_refused(template: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        compile_output(template)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        ("{id}.png", {"id": "a"}, "a.png"),
        ("{id}", {"id": "a"}, "a.png"),  # no extension: .png appended
        ("{id}.PNG", {"id": "a"}, "a.PNG"),
        ("{id}.{style}", {"id": "a", "style": "studio"}, "a.studio.png"),
        ("{c}/{id}.png", {"id": "a", "c": "x/y"}, "x_y/a.png"),  # only the template's / nest
        ("{c}/{id}", {"id": "a", "c": "shoes. "}, "shoes/a.png"),  # trailing dot/space
        ("{id}. ", {"id": "a"}, "a.png"),
        ("{id}.png", {"id": "CON"}, "_CON.png"),
        ("{id}.png", {"id": "nul"}, "_nul.png"),
        ("{id}.png", {"id": "com1"}, "_com1.png"),
        ("{id}.png", {"id": "LPT9"}, "_LPT9.png"),
        ("{id}.png", {"id": "con.tar"}, "_con.tar.png"),
        ("{c}/{id}.png", {"id": "a", "c": "aux"}, "_aux/a.png"),
        ("{id}.png", {"id": "console"}, "console.png"),
        ("{id}.png", {"id": "a:b"}, "a_b.png"),
        ("{id}.png", {"id": "e\u0301t\u00e9"}, "été.png"),
        ("{id}.png", {"id": "..."}, "....png"),
        ("imgs:{id}.png", {"id": "a"}, "imgs_a.png"),
        ("{id}.png", {"id": "C:"}, "C_.png"),
    ],
)
def test_rendered_paths(template: str, values: dict[str, str], expected: str) -> None:
    path, key = compile_output(template).render(values)
    assert path == expected
    assert key == unicodedata.normalize("NFC", expected).casefold()


@pytest.mark.parametrize("value", ["..", ".", "...", ". .", " "])
def test_a_value_that_is_a_whole_component_cannot_escape(value: str) -> None:
    with pytest.raises(ValueError, match=r"escapes the output folder|empty folder or file name"):
        render("{c}/{id}.png", c=value)


def test_an_empty_value_for_a_folder_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty folder or file name"):
        render("{c}/{id}.png", c="")


@pytest.mark.parametrize("char", ["a", "é", "鞋", "😀"])
def test_long_components_are_cut_to_255_bytes_keeping_png(char: str) -> None:
    path = render("{c}/{id}.png", id=char * 300, c=char * 300)
    folder, name = path.split("/")
    assert len(folder.encode()) <= MAX_COMPONENT_BYTES
    assert len(name.encode()) <= MAX_COMPONENT_BYTES
    assert name.endswith(".png")
    assert len(name.encode()) > MAX_COMPONENT_BYTES - 8


def test_the_collision_key_folds_case_after_nfc() -> None:
    _, key = compile_output("{id}").render({"id": "Straße"})
    _, other = compile_output("{id}").render({"id": "STRASSE"})
    assert key == other == "strasse.png"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Photo", "photo"),  # case only
        ("a/b", "a_b"),  # a sanitised slash meets a real underscore
        ("e\u0301", "\u00e9"),  # NFD and NFC forms of the same name
        ("con", "_con"),  # a device name prefixed onto an existing name
        ("shoes.", "shoes"),  # a trailing dot Windows would drop
        ("STRASSE", "Straße"),  # full case folding
    ],
)
def test_paths_that_would_be_the_same_file_are_refused(
    tmp_path: Path, first: str, second: str
) -> None:
    (tmp_path / "m.csv").write_text(
        f"id,prompt,name,output\na,one,{first},{{name}}/x\nb,two,{second},{{name}}/x\n",
        encoding="utf-8",
    )
    [error] = errors(tmp_path / "m.csv")
    assert (error.line, error.field) == (3, "output")
    assert "collides with line 2" in error.message


def test_ids_are_nfc_so_two_spellings_of_one_id_are_a_duplicate(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,prompt\ne\u0301,one\n\u00e9,two\n", encoding="utf-8")
    [error] = errors(tmp_path / "m.csv")
    assert (error.line, error.field) == (3, "id")
    assert error.message == "duplicate id 'é'; also on line 2"


def test_the_output_folder_structure_comes_from_the_template_only(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text(
        '{"id": "../../etc/passwd", "prompt": "x", "cat": "/root/.ssh"}\n', encoding="utf-8"
    )
    (tmp_path / "m.yaml").write_text(
        'output: "{cat}/{id}.png"\njobs:\n  - id: "../../etc/passwd"\n    prompt: x\n'
        '    vars: {cat: "/root/.ssh"}\n',
        encoding="utf-8",
    )
    assert specs(tmp_path / "m.jsonl")[0].output == ".._.._etc_passwd.png"
    assert specs(tmp_path / "m.yaml")[0].output == "_root_.ssh/.._.._etc_passwd.png"


def test_a_template_in_the_manifest_is_located(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(
        "jobs:\n  - id: a\n    prompt: hi\n    output: ../{id}.png\n", encoding="utf-8"
    )
    [error] = errors(tmp_path / "m.yaml")
    assert (error.line, error.field) == (4, "output")
    assert "escapes the output folder" in error.message


# Any UTF-8 text, salted with the pieces that attack paths: dots, separators, drive colons,
# device names, combining marks (NFC), line breaks, NUL, and runs long enough to be cut.
HOSTILE = st.sampled_from(
    [
        "..",
        ".",
        "/",
        "\\",
        ":",
        " ",
        "\x00",
        "\u0301",
        "CON",
        "nul",
        "e\u0301",
        "鞋",
        "😀",
        "\u2028",
        "." * 300,
        "鞋" * 100,
        "C:",
        "/etc/passwd",
        "../../x",
    ]
)
TEXT = st.lists(
    st.one_of(HOSTILE, st.text(st.characters(codec="utf-8"), max_size=20)), max_size=12
).map("".join)


def _check_path(path: str) -> None:
    assert not path.startswith("/")
    assert "\\" not in path
    assert ":" not in path
    assert unicodedata.is_normalized("NFC", path)
    assert path.endswith(".png")
    for part in path.split("/"):
        assert part not in ("", ".", "..")
        assert part.strip(". ")
        assert part == part.rstrip(". ")
        assert len(part.encode()) <= MAX_COMPONENT_BYTES
        assert all(unicodedata.category(c) != "Cc" for c in part)


@given(job_id=TEXT, category=TEXT, style=TEXT)
def test_any_value_renders_a_relative_nfc_path_or_a_clear_error(
    job_id: str, category: str, style: str
) -> None:
    for template in ("{id}.png", "{id}", "{category}/{id}-{style}.png", "out/{style}/{id}"):
        try:
            path, key = compile_output(template).render(
                {"id": job_id, "category": category, "style": style}
            )
        except ValueError as exc:
            reasons = ("escapes the output folder", "empty folder", "too long for a file name")
            assert any(reason in str(exc) for reason in reasons), exc
            continue
        _check_path(path)
        assert key == path.casefold()
        assert path.count("/") == template.count("/")


@given(job_id=TEXT.filter(lambda s: s.strip() != ""))
def test_any_id_in_a_manifest_gets_a_safe_output(job_id: str) -> None:
    # The builder's own checks (control characters, length) may refuse the id; anything it
    # accepts must get a safe path.
    from jobs.builder import JobBuilder

    found: list[ManifestError] = []
    builder = JobBuilder(
        path="m.csv",
        model="z-image-turbo",
        rules=RULES,
        output=compile_output("{id}.png"),
        warnings=[],
    )
    row = builder.build(found, 2, 1, job_id, "a prompt", None, None, None, None, {})
    if row is None:
        assert found and all("\n" not in e.format() for e in found)
        return
    spec = JobSpec.from_row(row)
    _check_path(spec.output)
    assert unicodedata.is_normalized("NFC", spec.id)
