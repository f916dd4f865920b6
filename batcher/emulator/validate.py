"""Pure validation of a ``z-image-turbo`` generation request (sections 1 and 2 of the contract).

Each check returns either the accepted value or an :class:`~batcher.emulator.codes.ApiError`,
never raises, so the route only has to answer what it gets back. The rules:

* ``Authorization: Bearer <key>``; without a configured key any ``sk-...`` key passes
  (401 ``InvalidApiKey`` otherwise);
* ``X-DashScope-Async: enable`` on this synchronous API gives 403 ``AccessDenied``;
* the body is a JSON object (400 ``BadRequest.IllegalInput``) naming ``model`` (400
  ``BadRequest.EmptyModel``; anything but ``z-image-turbo`` is 400 ``InvalidParameter``
  "Model not exist.") and ``input`` (400 ``BadRequest.EmptyInput``);
* exactly one ``user`` message with exactly one ``{"text"}`` item; the prompt is cut to 800
  characters, never rejected for length;
* ``parameters`` is optional; ``size`` is ``W*H`` with W*H in [512*512, 2048*2048], default
  ``1024*1536``; ``seed`` in [0, 2147483647]; ``prompt_extend`` a boolean, default false;
  ``n`` other than 1 is ``InvalidParameter`` "num_images_per_prompt must be 1"; other keys
  (``negative_prompt``, ``watermark``, ...) are ignored.
"""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from batcher.emulator.codes import ApiError, api_error

__all__ = [
    "DEFAULT_SIZE",
    "MAX_PIXELS",
    "MAX_PROMPT_CHARS",
    "MIN_PIXELS",
    "MODEL",
    "SEED_MAX",
    "GenerationRequest",
    "check_api_key",
    "check_async_header",
    "is_moderated",
    "parse_body",
    "parse_size",
    "validate_payload",
]

MODEL = "z-image-turbo"
MAX_PROMPT_CHARS = 800
DEFAULT_SIZE = (1024, 1536)
MIN_PIXELS = 512 * 512
MAX_PIXELS = 2048 * 2048
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
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return api_error("BadRequest.EmptyModel")
    if model != MODEL:
        return api_error("InvalidParameter", "Model not exist.")
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
    size = parse_size(params.get("size"))
    if isinstance(size, ApiError):
        return size
    seed = params.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX
    ):
        return _invalid(f"seed must be an integer between 0 and {SEED_MAX}")
    extend = params.get("prompt_extend", False)
    if extend is None:
        extend = False
    if not isinstance(extend, bool):
        return _invalid("prompt_extend must be a boolean")
    return GenerationRequest(
        model=model,
        prompt=prompt[:MAX_PROMPT_CHARS],
        width=size[0],
        height=size[1],
        seed=seed,
        prompt_extend=extend,
    )


def parse_size(value: Any) -> tuple[int, int] | ApiError:
    """``"W*H"`` (or None for the default ``1024*1536``) as ``(W, H)``, or ``InvalidParameter``.

    >>> parse_size("512*768")
    (512, 768)
    """
    if value is None:
        return DEFAULT_SIZE
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return _invalid(f"The size is not match the required format W*H, got {value!r}.")
    width, height = int(match[1]), int(match[2])
    if not MIN_PIXELS <= width * height <= MAX_PIXELS:
        return _invalid(
            f"The size is not match the valid range: {width}*{height} has {width * height} "
            f"pixels, allowed are {MIN_PIXELS} (512*512) to {MAX_PIXELS} (2048*2048)."
        )
    return width, height


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
