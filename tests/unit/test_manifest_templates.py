"""Templates: {name} placeholders in prompts and outputs, from a closed set of variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher.modelrules import RULES
from jobs.errors import ManifestError, ManifestInvalid
from jobs.manifest import open_manifest
from jobs.spec import JobSpec
from jobs.templates import TemplateError, compile_template


def specs(path: Path) -> list[JobSpec]:
    return list(open_manifest(path, rules=RULES))


def errors(path: Path) -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    return info.value.errors


@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        ("plain text", {}, "plain text"),
        ("{a}", {"a": "x"}, "x"),
        ("{a}-{b}", {"a": 1, "b": 2.5}, "1-2.5"),
        ("{n:04d}", {"n": 7}, "0007"),
        ("{s:>5}", {"s": "ab"}, "   ab"),
        ("{{literal}} {a}", {"a": "x"}, "{literal} x"),
        ("}}{{", {}, "}{"),
        ("{类别}/{名字}", {"类别": "鞋", "名字": "白"}, "鞋/白"),
        ("{a}{a}", {"a": "z"}, "zz"),
    ],
)
def test_rendering(template: str, values: dict[str, object], expected: str) -> None:
    assert compile_template(template).render(values) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{id.__class__}", "only plain variable names"),
        ("{x[0]}", "only plain variable names"),
        ("{a b}", "only plain variable names"),
        ("{}", "name a variable"),
        ("{0}", "name a variable"),
        ("{x!r}", "conversions such as !r are not allowed"),
        ("{x!s}", "conversions"),
        ("{x:{y}}", "placeholders inside a format spec"),
        ("{x", "expected '}' before end of string"),
        ("x}", "Single '}' encountered"),
        ("{x:", "write {{ or }} for a literal brace"),
    ],
)
def test_unsafe_or_malformed_templates_are_refused(template: str, message: str) -> None:
    with pytest.raises(TemplateError) as info:
        compile_template(template)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unknown_variable_is_named_with_what_is_available() -> None:
    with pytest.raises(TemplateError) as info:
        compile_template("a {colour} shoe").render({"color": "red", "id": "a"})
    assert str(info.value) == "unknown variable {colour}; available: color, id"


def test_a_spec_that_does_not_fit_the_value_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"\{n:d\}"):
        compile_template("{n:d}").render({"n": "seven"})


def test_builtin_variables_in_every_format(tmp_path: Path) -> None:
    prompt = "{id}|{seed}|{size}|{width}|{height}|{index}"
    (tmp_path / "m.csv").write_text(
        f'id,prompt,size,seed\na,"{prompt}",16:9,5\nb,"{prompt}",,\n', encoding="utf-8"
    )
    first, second = specs(tmp_path / "m.csv")
    assert first.prompt == "a|5|1536*864|1536|864|1"
    assert second.prompt == f"b|{second.seed}|1024*1536|1024|1536|2"

    (tmp_path / "m.jsonl").write_text(
        json.dumps({"id": "j", "prompt": prompt, "size": "1:1", "seed": 9}) + "\n",
        encoding="utf-8",
    )
    assert specs(tmp_path / "m.jsonl")[0].prompt == "j|9|1280*1280|1280|1280|1"

    (tmp_path / "m.yaml").write_text(
        f'jobs:\n  - id: y\n    prompt: "{prompt}"\n    seed: 3\n', encoding="utf-8"
    )
    assert specs(tmp_path / "m.yaml")[0].prompt == "y|3|1024*1536|1024|1536|1"


def test_variables_come_from_columns_keys_vars_defaults_and_the_matrix(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        'id,prompt,colour,kind\na,"a {colour} {kind}",red,shoe\n', encoding="utf-8"
    )
    assert specs(tmp_path / "m.csv")[0].prompt == "a red shoe"
    (tmp_path / "m.jsonl").write_text(
        '{"id": "a", "prompt": "{k:03d} {flag} {w}", "k": 7, "flag": true, "vars": {"w": 1.5}}\n',
        encoding="utf-8",
    )
    assert specs(tmp_path / "m.jsonl")[0].prompt == "007 true 1.5"
    (tmp_path / "m.yaml").write_text(
        "defaults:\n  vars: {brand: Acme, colour: red}\n"
        "matrix:\n  style: [studio]\n"
        "jobs:\n"
        '  - id: a\n    prompt: "{brand} {colour} {style} {released}"\n'
        "    vars: {colour: blue, released: 2024-05-01}\n",
        encoding="utf-8",
    )
    assert specs(tmp_path / "m.yaml")[0].prompt == "Acme blue studio 2024-05-01"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("m.csv", 'id,prompt,color\na,"a {colour}",red\n'),
        ("m.jsonl", '{"id": "a", "prompt": "a {colour}", "color": "red"}\n'),
        ("m.yaml", 'jobs:\n  - id: a\n    prompt: "a {colour}"\n    vars: {color: red}\n'),
    ],
)
def test_an_unknown_variable_is_a_located_error(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    [error] = errors(tmp_path / name)
    assert error.field == "prompt"
    assert error.line == (3 if name == "m.yaml" else 2 if name == "m.csv" else 1)
    assert error.message.startswith("unknown variable {colour}; available: color, height, id")


def test_a_prompt_without_braces_is_taken_as_is(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,prompt\na,100% cotton: (tee) [x] $5\n", encoding="utf-8")
    assert specs(tmp_path / "m.csv")[0].prompt == "100% cotton: (tee) [x] $5"


def test_literal_braces_in_a_prompt(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text('id,prompt\na,"a {{json}} sign"\n', encoding="utf-8")
    assert specs(tmp_path / "m.csv")[0].prompt == "a {json} sign"


def test_a_stray_brace_in_a_prompt_is_an_error_that_says_how_to_escape(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text('id,prompt\na,"a } sign"\n', encoding="utf-8")
    [error] = errors(tmp_path / "m.csv")
    assert (error.line, error.field) == (2, "prompt")
    assert "write {{ or }}" in error.message


def test_a_prompt_that_renders_empty_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("id,prompt,x\na,{x},\n", encoding="utf-8")
    [error] = errors(tmp_path / "m.csv")
    assert (error.field, error.message) == ("prompt", "empty once filled in")


def test_output_templates_see_the_same_variables(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        "id,prompt,output,cat\na,hi,{cat}/{index:03d}-{width}x{height},shoes\n", encoding="utf-8"
    )
    assert specs(tmp_path / "m.csv")[0].output == "shoes/001-1024x1536.png"


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("m.csv", "id,prompt,output\na,hi,{category}/{id}.png\n", 2),
        ("m.yaml", 'output: "{category}/{id}.png"\njobs:\n  - id: a\n    prompt: hi\n', 3),
    ],
)
def test_an_unknown_variable_in_the_output_is_an_error(
    tmp_path: Path, name: str, text: str, line: int
) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    [error] = errors(tmp_path / name)
    assert (error.line, error.field) == (line, "output")
    assert "unknown variable {category}" in error.message


@pytest.mark.parametrize("name", ["width", "height", "index"])
def test_builtin_names_cannot_be_columns(tmp_path: Path, name: str) -> None:
    (tmp_path / "m.csv").write_text(f"id,prompt,{name}\na,hi,1\n", encoding="utf-8")
    [error] = errors(tmp_path / "m.csv")
    assert (error.line, error.field) == (1, name)
    assert "reserved template variable" in error.message


@pytest.mark.parametrize("name", ["id", "seed", "size", "width", "height", "index"])
def test_builtin_names_cannot_be_vars(tmp_path: Path, name: str) -> None:
    (tmp_path / "m.yaml").write_text(
        f"jobs:\n  - id: a\n    prompt: hi\n    vars:\n      {name}: 3\n", encoding="utf-8"
    )
    [error] = errors(tmp_path / "m.yaml")
    assert (error.line, error.field) == (5, f"vars.{name}")
    assert "reserved template variable" in error.message
