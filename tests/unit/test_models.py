"""The model registry and the manifest rules read from it: facts as data, one row a model."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import batcher.modelrules
import batcher.models
from batcher.modelrules import RULES
from batcher.models import MODELS, ApiProtocol, UnknownModel, model
from jobs.errors import ManifestInvalid
from jobs.manifest import open_manifest
from jobs.params import load_params

SYNC = {"z-image-turbo", "qwen-image", "qwen-image-plus", "qwen-image-max"}
TASK = {"wan2.2-t2i-flash", "wan2.2-t2i-plus", "wan2.5-t2i-preview", "wanx2.1-t2i-turbo"}


def test_every_model_is_registered_with_its_protocol() -> None:
    assert set(MODELS) == SYNC | TASK
    assert {m.name for m in MODELS.values() if m.protocol is ApiProtocol.SYNC} == SYNC
    assert {m.name for m in MODELS.values() if m.protocol is ApiProtocol.TASK} == TASK
    assert all(name == entry.name for name, entry in MODELS.items())


def test_quotas_and_limits_are_the_published_ones() -> None:
    assert model("z-image-turbo").quota.rps == 2
    assert model("z-image-turbo").quota.concurrent_tasks is None
    assert model("qwen-image-max").quota.rps == pytest.approx(2 / 60)
    assert model("wan2.5-t2i-preview").quota.concurrent_tasks == 5
    assert model("wan2.2-t2i-flash").quota.concurrent_tasks == 2
    assert model("wan2.5-t2i-preview").prompt_limit == 2000
    assert model("wan2.2-t2i-plus").prompt_limit == 800
    assert model("z-image-turbo").negative_prompt_limit is None
    assert model("qwen-image").negative_prompt_limit == 500
    assert [model(m).n_max for m in sorted(TASK)] == [4, 4, 4, 4]
    assert [model(m).n_max for m in sorted(SYNC)] == [1, 1, 1, 1]
    assert {model(m).prompt_extend_default for m in SYNC - {"z-image-turbo"} | TASK} == {True}
    assert not model("z-image-turbo").prompt_extend_default
    assert model("z-image-turbo").prices.extend_factor == 2


def test_an_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModel, match=r"unknown model 'sdxl'; known: z-image-turbo, qwen"):
        model("sdxl")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_chooses_the_model_at_the_top_in_defaults_and_per_job(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.yaml",
        "model: qwen-image\n"
        "defaults:\n  negative_prompt: blurry\n  model: wan2.2-t2i-plus\n"
        "jobs:\n"
        "  - {id: a, prompt: poster, model: qwen-image}\n"
        "  - {id: b, prompt: shoe, model: wan2.2-t2i-flash, n: 1, watermark: true, size: 3:4}\n"
        "  - {id: c, prompt: fast}\n",
    )
    manifest = open_manifest(path, rules=RULES)
    assert manifest.model == "qwen-image"
    a, b, c = list(manifest)
    assert (a.model, a.size, a.n, a.prompt_extend) == ("qwen-image", "1328*1328", 1, True)
    assert load_params(a.params) == {"negative_prompt": "blurry"}
    assert (b.model, b.size, b.n) == ("wan2.2-t2i-flash", "864*1152", 1)
    assert load_params(b.params) == {"negative_prompt": "blurry", "watermark": True}
    assert (c.model, c.size, c.n, c.prompt_extend) == ("wan2.2-t2i-plus", "1024*1024", 1, True)
    assert load_params(c.params) == {"negative_prompt": "blurry"}


def test_csv_and_jsonl_take_model_columns(tmp_path: Path) -> None:
    csv = write(
        tmp_path,
        "m.csv",
        "id,prompt,model,n,negative_prompt,watermark\n"
        "a,one,,,,\n"
        "b,two,wan2.5-t2i-preview,1,low quality,no\n",
    )
    a, b = list(open_manifest(csv, rules=RULES))
    assert (a.model, a.n, a.params) == ("z-image-turbo", 1, None)
    assert (b.model, b.n, b.size) == ("wan2.5-t2i-preview", 1, "1280*1280")
    assert load_params(b.params) == {"negative_prompt": "low quality", "watermark": False}
    jsonl = write(
        tmp_path,
        "m.jsonl",
        '{"id": "q", "prompt": "海报", "model": "qwen-image-plus", "size": "16:9"}\n',
    )
    [q] = list(open_manifest(jsonl, rules=RULES))
    assert (q.model, q.size) == ("qwen-image-plus", "1664*928")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "id,prompt,model\na,x,dall-e\n",
            "m.csv:2: model: unknown model 'dall-e'; known: z-image-turbo, qwen-image,",
        ),
        (
            "id,prompt,n\na,x,2\n",
            "m.csv:2: n: z-image-turbo makes 1 image a call, not 2 (several images a call: wan",
        ),
        (
            "id,prompt,model,n\na,x,wan2.2-t2i-flash,5\n",
            "m.csv:2: n: 5 is outside 1..4 for wan2.2-t2i-flash",
        ),
        (
            "id,prompt,negative_prompt\na,x,blurry\n",
            "m.csv:2: negative_prompt: z-image-turbo takes no negative prompt",
        ),
        ("id,prompt,watermark\na,x,maybe\n", "m.csv:2: watermark: 'maybe': write true/false"),
        (
            "id,prompt,model,size\na,x,qwen-image,1024*1536\n",
            "m.csv:2: size: 1024*1536 is not a qwen-image size (one of 1664*928",
        ),
        ("id,prompt,n\na,x,two\n", "m.csv:2: n: 'two' is not a whole number"),
        (
            "id,prompt,model,n\na,x,qwen-image,2\n",
            "m.csv:2: n: qwen-image makes 1 image a call, not 2 (several images a call: wan",
        ),
    ],
)
def test_model_parameters_are_checked_per_model_and_located(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, "m.csv", text)
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    first = info.value.errors[0].format()
    assert first.startswith(str(tmp_path) + "/")
    assert first[len(str(tmp_path)) + 1 :].startswith(expected), first


def test_a_yaml_parameter_error_names_its_own_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.yaml",
        "jobs:\n  - id: a\n    model: qwen-image\n    prompt: hi\n    negative_prompt: '"
        + "x" * 501
        + "'\n",
    )
    with pytest.raises(ManifestInvalid) as info:
        list(open_manifest(path, rules=RULES))
    [error] = info.value.errors
    assert (error.line, error.field) == (5, "negative_prompt")
    assert error.message == "501 characters; qwen-image takes at most 500"


def test_a_long_prompt_warns_at_the_models_own_limit(tmp_path: Path) -> None:
    prompt = "p" * 1500
    path = write(
        tmp_path,
        "m.jsonl",
        f'{{"id": "a", "prompt": "{prompt}"}}\n'
        f'{{"id": "b", "prompt": "{prompt}", "model": "wan2.5-t2i-preview"}}\n',
    )
    manifest = open_manifest(path, rules=RULES)
    assert len(list(manifest)) == 2
    [warning] = manifest.warnings
    assert warning.line == 1
    assert warning.message == "1500 characters; z-image-turbo uses only the first 800"


def test_a_matrix_can_compare_models(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "m.yaml",
        "matrix:\n  model: [z-image-turbo, qwen-image]\n"
        "output: '{model}/{id}.png'\njobs:\n  - {id: a, prompt: hi, size: '1:1'}\n",
    )
    specs = list(open_manifest(path, rules=RULES))
    assert [(s.id, s.model, s.size, s.output) for s in specs] == [
        ("a-z-image-turbo", "z-image-turbo", "1280*1280", "z-image-turbo/a.png"),
        ("a-qwen-image", "qwen-image", "1328*1328", "qwen-image/a.png"),
    ]


def test_ids_of_jobs_without_model_parameters_did_not_change(tmp_path: Path) -> None:
    # The derived id of a plain row is the same as before models were chosen per job.
    path = write(tmp_path, "m.csv", "prompt\nhello\n")
    [spec] = list(open_manifest(path, rules=RULES))
    assert spec.id == "8f18f1187f787be2"


def test_doctests() -> None:
    assert doctest.testmod(batcher.models).failed == 0
    assert doctest.testmod(batcher.modelrules, optionflags=doctest.ELLIPSIS).failed == 0
