"""Pure validation of a synchronous generation request, per model of the registry.

Each check returns either the accepted value or an :class:`~batcher.emulator.codes.ApiError`,
never raises, so the route only has to answer what it gets back. The rules:

* ``Authorization: Bearer <key>``; without a configured key any ``sk-...`` key passes
  (401 ``InvalidApiKey`` otherwise);
* ``X-DashScope-Async: enable`` on this synchronous API gives 403 ``AccessDenied``;
* the body is a JSON object (400 ``BadRequest.IllegalInput``) naming ``model`` (400
  ``BadRequest.EmptyModel``; a model the registry (``batcher.models``) does not call
  synchronously is 400 ``InvalidParameter`` "Model not exist.") and ``input`` (400
  ``BadRequest.EmptyInput``);
* exactly one ``user`` message with exactly one ``{"text"}`` item; the prompt is cut to the
  model's limit, never rejected for length;
* ``parameters`` is optional; ``size`` is ``W*H`` within the model's size policy (its default
  when absent); ``seed`` in [0, 2147483647]; ``prompt_extend`` a boolean, default the
  model's; ``n`` other than 1 is ``InvalidParameter`` "num_images_per_prompt must be 1";
  ``negative_prompt`` must be text within the model's limit where the model takes one (and is
  ignored by ``z-image-turbo``, whose documentation does not say), ``watermark`` a boolean.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from batcher.emulator.codes import ApiError, api_error
from batcher.models import MODELS, ApiProtocol, Model

__all__ = [
    "SEED_MAX",
    "GenerationRequest",
    "check_api_key",
    "check_async_header",
    "check_common_parameters",
    "is_moderated",
    "parse_body",
    "parse_size",
    "validate_payload",
]

SEED_MAX = 2_147_483_647

_SIZE = re.compile(r"([0-9]{1,7})\*([0-9]{1,7})")


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationRequest:
    """An accepted request: the (possibly cut) prompt and the effective parameters."""

    model: str
    prompt: str
    width: int
    height: int
    seed: int | None
    prompt_extend: bool
    n: int = 1
    negative_prompt: str | None = None
    watermark: bool = False


def check_api_key(authorization: str | None, expected: str | None) -> str | ApiError:
    """The caller's key from an ``Authorization`` header value, or 401 ``InvalidApiKey``.

    ``expected`` None accepts any key starting with ``sk-``.
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return api_error("InvalidApiKey")
    if expected is None:
        ok = token.startswith("sk-") and len(token) > 3
    else:
        ok = hmac.compare_digest(token.encode(), expected.encode())
    return token if ok else api_error("InvalidApiKey")


def check_async_header(value: str | None) -> ApiError | None:
    """403 ``AccessDenied`` if ``X-DashScope-Async`` asks for an async call of this sync API."""
    if value is not None and value.strip().lower() == "enable":
        return api_error("AccessDenied", "Current user api does not support asynchronous calls.")
    return None


def parse_body(raw: bytes) -> GenerationRequest | ApiError:
    """Decode a request body and validate it."""
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return api_error("BadRequest.IllegalInput")
    return validate_payload(payload)


def validate_payload(payload: Any) -> GenerationRequest | ApiError:
    """Validate a decoded JSON body."""
    if not isinstance(payload, dict):
        return api_error("BadRequest.IllegalInput", "The request body must be a JSON object.")
    model = _model(payload, ApiProtocol.SYNC)
    if isinstance(model, ApiError):
        return model
    prompt = _prompt(payload.get("input"))
    if isinstance(prompt, ApiError):
        return prompt
    params = payload.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, dict):
        return _invalid("parameters must be a JSON object")
    n = params.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != 1:
        return _invalid("num_images_per_prompt must be 1")
    negative: Any = params.get("negative_prompt")
    if model.negative_prompt_limit is None:
        negative = None  # not documented for this model: ignored
    return check_common_parameters(model, prompt, negative, params, 1)


def check_common_parameters(
    model: Model, prompt: str, negative: Any, params: dict[str, Any], n: int
) -> GenerationRequest | ApiError:
    """Check size, seed, prompt_extend, watermark and negative_prompt as ``model`` takes them
    (shared by the synchronous and the task API); the prompt is cut to the model's limit."""
    size = parse_size(params.get("size"), model)
    if isinstance(size, ApiError):
        return size
    seed = params.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX
    ):
        return _invalid(f"seed must be an integer between 0 and {SEED_MAX}")
    extend = params.get("prompt_extend", model.prompt_extend_default)
    if extend is None:
        extend = model.prompt_extend_default
    if not isinstance(extend, bool):
        return _invalid("prompt_extend must be a boolean")
    watermark = params.get("watermark", False)
    if watermark is None:
        watermark = False
    if not isinstance(watermark, bool):
        return _invalid("watermark must be a boolean")
    if negative is not None:
        limit = model.negative_prompt_limit or 0
        if not isinstance(negative, str):
            return _invalid("negative_prompt must be a string")
        if len(negative) > limit:
            return _invalid(f"negative_prompt must be at most {limit} characters")
    return GenerationRequest(
        model=model.name,
        prompt=prompt[: model.prompt_limit],
        width=size[0],
        height=size[1],
        seed=seed,
        prompt_extend=extend,
        n=n,
        negative_prompt=negative,
        watermark=watermark,
    )


def parse_size(value: Any, model: Model | None = None) -> tuple[int, int] | ApiError:
    """``"W*H"`` (or None for the model's default) as ``(W, H)``, or ``InvalidParameter``
    when it is not within the model's size policy (``z-image-turbo``'s by default).

    >>> parse_size("512*768")
    (512, 768)
    >>> parse_size("1024*1024", MODELS["qwen-image"]).message
    'The size is not match the valid sizes of qwen-image: 1024*1024 is not one of ...'
    """
    policy = (model or MODELS["z-image-turbo"]).sizes
    name = (model or MODELS["z-image-turbo"]).name
    if value is None:
        default_width, default_height = policy.default.split("*")
        return int(default_width), int(default_height)
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return _invalid(f"The size is not match the required format W*H, got {value!r}.")
    width, height = int(match[1]), int(match[2])
    problem = policy.problem(width, height)
    if problem is not None:
        return _invalid(f"The size is not match the valid sizes of {name}: {problem}.")
    return width, height


def _model(payload: dict[str, Any], protocol: ApiProtocol) -> Model | ApiError:
    """The registry row of the body's ``model``, if it is called with ``protocol``."""
    name = payload.get("model")
    if not isinstance(name, str) or not name:
        return api_error("BadRequest.EmptyModel")
    model = MODELS.get(name)
    if model is None or model.protocol is not protocol:
        return api_error("InvalidParameter", "Model not exist.")
    return model


def is_moderated(prompt: str, words: tuple[str, ...]) -> bool:
    """Whether ``prompt`` contains one of ``words``, ignoring case."""
    folded = prompt.casefold()
    return any(word.casefold() in folded for word in words)


def _prompt(value: Any) -> str | ApiError:
    if not isinstance(value, dict):
        return api_error("BadRequest.EmptyInput")
    messages = value.get("messages")
    if messages is None:
        return _invalid("Field required: input.messages")
    if not isinstance(messages, list) or len(messages) != 1:
        return _invalid("input.messages must hold exactly one message (single-turn only)")
    message = messages[0]
    if not isinstance(message, dict) or message.get("role") != "user":
        return _invalid("input.messages[0].role must be user")
    content = message.get("content")
    if not isinstance(content, list):
        return _invalid("Field required: input.messages[0].content")
    texts = [item for item in content if isinstance(item, dict) and "text" in item]
    if len(texts) != 1 or len(content) != 1:
        return _invalid("input.messages[0].content must hold exactly one text item")
    text = texts[0]["text"]
    if not isinstance(text, str):
        return _invalid("input.messages[0].content[0].text must be a string")
    if not text.strip():
        return _invalid("The prompt must not be empty.")
    return text


def _invalid(message: str) -> ApiError:
    return api_error("InvalidParameter", message)
