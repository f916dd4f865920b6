"""The emulator's pure request validation, URL signing and image drawing."""

from __future__ import annotations

import hashlib
import io
import json
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batcher.emulator.codes import ApiError
from batcher.emulator.images import render_png
from batcher.emulator.urls import UrlCheck, UrlSigner, image_path, oss_error_xml
from batcher.emulator.validate import (
    GenerationRequest,
    check_api_key,
    check_async_header,
    is_moderated,
    parse_body,
    parse_size,
    validate_payload,
)


def body(prompt: Any = "a red fox", **parameters: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": "z-image-turbo",
        "input": {"messages": [{"role": "user", "content": [{"text": prompt}]}]},
    }
    if parameters:
        payload["parameters"] = parameters
    return payload


def test_minimal_request_takes_the_defaults() -> None:
    assert validate_payload(body()) == GenerationRequest(
        model="z-image-turbo",
        prompt="a red fox",
        width=1024,
        height=1536,
        seed=None,
        prompt_extend=False,
    )


def test_parameters_are_read_and_unknown_ones_ignored() -> None:
    parsed = validate_payload(
        body(
            size="512*768",
            seed=2_147_483_647,
            prompt_extend=True,
            n=1,
            negative_prompt="blur",
            watermark=True,
        )
    )
    assert isinstance(parsed, GenerationRequest)
    assert (parsed.width, parsed.height, parsed.seed, parsed.prompt_extend) == (
        512,
        768,
        2_147_483_647,
        True,
    )


def test_prompt_is_cut_to_800_characters_not_rejected() -> None:
    parsed = validate_payload(body("狐" * 1000))
    assert isinstance(parsed, GenerationRequest)
    assert parsed.prompt == "狐" * 800


def _mutate(change: str) -> Any:
    payload = body()
    if change == "array":
        return [payload]
    if change == "no model":
        del payload["model"]
    elif change == "empty model":
        payload["model"] = ""
    elif change == "other model":
        payload["model"] = "wan2.2-t2i-flash"  # an async task model, not on this endpoint
    elif change == "no input":
        del payload["input"]
    elif change == "no messages":
        payload["input"] = {}
    elif change == "two messages":
        payload["input"]["messages"] *= 2
    elif change == "assistant":
        payload["input"]["messages"][0]["role"] = "assistant"
    elif change == "content not a list":
        payload["input"]["messages"][0]["content"] = "a fox"
    elif change == "no text":
        payload["input"]["messages"][0]["content"] = []
    elif change == "two texts":
        payload["input"]["messages"][0]["content"] = [{"text": "a"}, {"text": "b"}]
    elif change == "image item":
        payload["input"]["messages"][0]["content"].append({"image": "http://x/y.png"})
    elif change == "text not a string":
        payload["input"]["messages"][0]["content"] = [{"text": 5}]
    elif change == "blank prompt":
        payload["input"]["messages"][0]["content"] = [{"text": "  "}]
    elif change == "parameters a list":
        payload["parameters"] = []
    return payload


@pytest.mark.parametrize(
    ("change", "code", "fragment"),
    [
        ("array", "BadRequest.IllegalInput", "JSON object"),
        ("no model", "BadRequest.EmptyModel", "model"),
        ("empty model", "BadRequest.EmptyModel", "model"),
        ("other model", "InvalidParameter", "Model not exist."),
        ("no input", "BadRequest.EmptyInput", "input"),
        ("no messages", "InvalidParameter", "input.messages"),
        ("two messages", "InvalidParameter", "exactly one message"),
        ("assistant", "InvalidParameter", "role must be user"),
        ("content not a list", "InvalidParameter", "content"),
        ("no text", "InvalidParameter", "exactly one text item"),
        ("two texts", "InvalidParameter", "exactly one text item"),
        ("image item", "InvalidParameter", "exactly one text item"),
        ("text not a string", "InvalidParameter", "must be a string"),
        ("blank prompt", "InvalidParameter", "must not be empty"),
        ("parameters a list", "InvalidParameter", "parameters"),
    ],
)
def test_structure_errors(change: str, code: str, fragment: str) -> None:
    error = validate_payload(_mutate(change))
    assert isinstance(error, ApiError)
    assert (error.status, error.code) == (400, code)
    assert fragment in error.message


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"n": 2}, "num_images_per_prompt must be 1"),
        ({"n": 0}, "num_images_per_prompt must be 1"),
        ({"n": True}, "num_images_per_prompt must be 1"),
        ({"n": "1"}, "num_images_per_prompt must be 1"),
        ({"size": "512x512"}, "The size is not match"),
        ({"size": "512*512*1"}, "The size is not match"),
        ({"size": " 512*512"}, "The size is not match"),
        ({"size": 512}, "The size is not match"),
        ({"size": "511*512"}, "The size is not match the valid sizes of z-image-turbo"),
        ({"size": "2048*2049"}, "The size is not match the valid sizes of z-image-turbo"),
        ({"size": "0*4096"}, "The size is not match the valid sizes of z-image-turbo"),
        ({"seed": -1}, "seed must be an integer"),
        ({"seed": 2_147_483_648}, "seed must be an integer"),
        ({"seed": "7"}, "seed must be an integer"),
        ({"seed": 7.0}, "seed must be an integer"),
        ({"seed": True}, "seed must be an integer"),
        ({"prompt_extend": "yes"}, "prompt_extend must be a boolean"),
        ({"prompt_extend": 1}, "prompt_extend must be a boolean"),
    ],
)
def test_parameter_errors(parameters: dict[str, Any], fragment: str) -> None:
    error = validate_payload(body(**parameters))
    assert isinstance(error, ApiError)
    assert (error.status, error.code) == (400, "InvalidParameter")
    assert fragment in error.message


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (None, (1024, 1536)),
        ("512*512", (512, 512)),
        ("2048*2048", (2048, 2048)),
        ("64*4096", (64, 4096)),
    ],
)
def test_parse_size_bounds(size: str | None, expected: tuple[int, int]) -> None:
    assert parse_size(size) == expected


def test_parse_body_rejects_non_json() -> None:
    for raw in (b"", b"{", b"model=z-image-turbo", b"\xff\xfe{}"):
        error = parse_body(raw)
        assert isinstance(error, ApiError)
        assert (error.status, error.code) == (400, "BadRequest.IllegalInput")
    assert isinstance(parse_body(json.dumps(body()).encode()), GenerationRequest)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_validation_never_raises(payload: Any) -> None:
    assert isinstance(validate_payload(payload), GenerationRequest | ApiError)


@pytest.mark.parametrize(
    ("header", "expected", "accepted"),
    [
        ("Bearer sk-abc", None, "sk-abc"),
        ("bearer   sk-abc ", None, "sk-abc"),
        ("Bearer sk-abc", "sk-abc", "sk-abc"),
        (None, None, None),
        ("", None, None),
        ("sk-abc", None, None),
        ("Basic sk-abc", None, None),
        ("Bearer sk-", None, None),
        ("Bearer abc", None, None),
        ("Bearer sk-abd", "sk-abc", None),
    ],
)
def test_check_api_key(header: str | None, expected: str | None, accepted: str | None) -> None:
    result = check_api_key(header, expected)
    if accepted is None:
        assert isinstance(result, ApiError)
        assert (result.status, result.code) == (401, "InvalidApiKey")
        assert "sk-" not in result.message
    else:
        assert result == accepted


def test_check_async_header() -> None:
    assert check_async_header(None) is None
    assert check_async_header("disable") is None
    error = check_async_header("Enable")
    assert error is not None
    assert (error.status, error.code) == (403, "AccessDenied")
    assert "asynchronous" in error.message


def test_is_moderated_ignores_case() -> None:
    assert is_moderated("A Forbidden thing", ("forbidden",))
    assert not is_moderated("a fine thing", ("forbidden", "gore"))
    assert not is_moderated("anything", ())


def test_signed_urls() -> None:
    signer = UrlSigner(secret=b"s" * 32, access_key_id="LTAI5tTest")
    path = image_path("0123abcd-0000-4000-8000-0000000000ef", 1_764_000_000.0)
    assert re.fullmatch(r"/1d/ef/20251124/0123abcd/0123abcd-0000-4000-8000-0000000000ef\.png", path)
    signature = signer.signature(path, 2000)
    assert signer.check(path, "2000", "LTAI5tTest", signature, 1999.0) is UrlCheck.OK
    assert signer.check(path, "2000", "LTAI5tTest", signature, 2001.0) is UrlCheck.EXPIRED
    assert signer.check(path, "2001", "LTAI5tTest", signature, 1.0) is UrlCheck.BAD_SIGNATURE
    assert signer.check(path, "2000", "LTAI5tOther", signature, 1.0) is UrlCheck.BAD_SIGNATURE
    assert signer.check(path + "x", "2000", "LTAI5tTest", signature, 1.0) is UrlCheck.BAD_SIGNATURE
    assert (
        signer.check(path, "2000", "LTAI5tTest", "A" + signature[1:], 1.0) is UrlCheck.BAD_SIGNATURE
    )
    assert signer.check(path, "-1", "LTAI5tTest", signature, 1.0) is UrlCheck.BAD_SIGNATURE
    assert signer.check(path, None, None, None, 1.0) is UrlCheck.MISSING
    query = signer.query(path, 2000)
    assert query.startswith("Expires=2000&OSSAccessKeyId=LTAI5tTest&Signature=")
    assert "+" not in query and "/" not in query.split("Signature=")[1]


def test_oss_error_xml_is_xml() -> None:
    root = ET.fromstring(
        oss_error_xml("AccessDenied", "Request has expired.", "RID", Expires="x<y")
    )
    assert root.tag == "Error"
    assert root.findtext("Code") == "AccessDenied"
    assert root.findtext("Message") == "Request has expired."
    assert root.findtext("Expires") == "x<y"


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("width", "height"), [(512, 512), (1024, 1536), (513, 511), (64, 4096), (4096, 64)]
)
def test_png_has_the_exact_size(width: int, height: int) -> None:
    data = render_png(prompt="a lighthouse at night", seed=3, width=width, height=height)
    Image.open(io.BytesIO(data)).verify()
    assert _image(data).size == (width, height)


def test_png_is_deterministic_and_distinct() -> None:
    def digest(prompt: str, seed: int, width: int = 512) -> str:
        data = render_png(prompt=prompt, seed=seed, width=width, height=512)
        return hashlib.sha256(data).hexdigest()

    assert digest("a fox", 1) == digest("a fox", 1)
    hashes = {digest("a fox", 1), digest("a fox", 2), digest("a fax", 1), digest("a fox", 1, 640)}
    assert len(hashes) == 4
    # Prompts that differ only beyond what fits in the picture still give different pixels.
    long = "word " * 400
    first = _image(render_png(prompt=long + "a", seed=1, width=512, height=512))
    second = _image(render_png(prompt=long + "b", seed=1, width=512, height=512))
    assert first.tobytes() != second.tobytes()


def test_png_shows_the_prompt_and_metadata() -> None:
    image = _image(render_png(prompt="a red fox", seed=9, width=512, height=512))
    assert image.mode == "P"
    assert image.info["Description"] == "a red fox"
    assert image.info["Comment"] == "seed=9 size=512*512"
    # Text was drawn: the top band holds pixels of the ink colour (palette index 1).
    top = image.crop((0, 0, 512, 120))
    assert 1 in set(top.tobytes())


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=800))
def test_png_never_fails_on_odd_text(prompt: str) -> None:
    data = render_png(prompt=prompt, seed=0, width=512, height=512)
    assert _image(data).size == (512, 512)


def test_png_with_cjk_text() -> None:
    data = render_png(
        prompt="一只在雪林中的红狐狸，清晨，柔和的光线" * 30, seed=1, width=768, height=1024
    )
    assert _image(data).size == (768, 1024)


def qwen(**parameters: Any) -> dict[str, Any]:
    payload = body(**parameters)
    payload["model"] = "qwen-image"
    return payload


def test_each_sync_model_has_its_own_sizes_and_defaults() -> None:
    accepted = validate_payload(qwen(size="1664*928", negative_prompt="blurry", watermark=True))
    assert isinstance(accepted, GenerationRequest)
    assert (accepted.model, accepted.width, accepted.height) == ("qwen-image", 1664, 928)
    assert (accepted.negative_prompt, accepted.watermark) == ("blurry", True)
    default = validate_payload(qwen())
    assert isinstance(default, GenerationRequest)
    assert (default.width, default.height, default.prompt_extend) == (1328, 1328, True)
    refused = validate_payload(qwen(size="1024*1536"))  # a z-image-turbo size
    assert isinstance(refused, ApiError)
    assert "valid sizes of qwen-image" in refused.message


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"n": 2}, "num_images_per_prompt must be 1"),
        ({"negative_prompt": "x" * 501}, "negative_prompt must be at most 500 characters"),
        ({"negative_prompt": 5}, "negative_prompt must be a string"),
        ({"watermark": "no"}, "watermark must be a boolean"),
    ],
)
def test_qwen_parameter_errors(parameters: dict[str, Any], fragment: str) -> None:
    error = validate_payload(qwen(**parameters))
    assert isinstance(error, ApiError)
    assert (error.status, error.code) == (400, "InvalidParameter")
    assert fragment in error.message


def test_z_image_ignores_the_parameters_it_does_not_document() -> None:
    accepted = validate_payload(body(negative_prompt="x" * 900, watermark=True))
    assert isinstance(accepted, GenerationRequest)
    assert accepted.negative_prompt is None


def test_the_prompt_is_cut_at_the_models_limit() -> None:
    accepted = validate_payload(qwen() | {"input": body("p" * 900)["input"]})
    assert isinstance(accepted, GenerationRequest)
    assert len(accepted.prompt) == 800
