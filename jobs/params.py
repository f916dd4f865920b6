"""The seam between a manifest and the models: what ``jobs`` asks, and ``batcher`` answers.

``jobs`` knows the syntax of a manifest (which fields exist, how a size or a boolean is
written) but no model's facts: which models exist, which sizes each takes, how long a prompt
may be, which parameters it accepts. Those come from a ``ModelRules`` object handed to
:func:`jobs.manifest.open_manifest` by the caller (``batcher.models.RULES``); every answer is a
value or a one-line message the manifest error is built from (``file:line: field: message``).

A job's model parameters beyond prompt, size, seed and prompt_extend are stored as ``n`` (the
number of images one call makes) and ``params``, a JSON object of the optional ones a manifest
gave (``negative_prompt``, ``watermark``), or ``None`` when it gave none.
"""

from __future__ import annotations

import json
from typing import Protocol

__all__ = ["ModelRules", "dump_params", "load_params"]


class ModelRules(Protocol):
    """The per-model checks a manifest needs (implemented in ``batcher.models``)."""

    @property
    def default_model(self) -> str:
        """The model of a job whose manifest names none."""

    @property
    def reference(self) -> tuple[str, str, str] | None:
        """(package folder, module, attribute) a helper process imports these rules from,
        or ``None`` if they cannot be found that way (then no helper process is used)."""

    def model_problem(self, model: str) -> str | None:
        """Why ``model`` cannot be used (e.g. unknown: the known ones listed), or None."""

    def size(self, model: str, written: str | None) -> tuple[str, int, int]:
        """The ``W*H`` a written size means for ``model`` (its default for ``None``), with
        width and height; raises ``ValueError`` with a one-line message."""

    def prompt_limit(self, model: str) -> int:
        """Characters of the prompt the service reads; a longer prompt is a warning."""

    def prompt_extend_default(self, model: str) -> bool:
        """The ``prompt_extend`` a job of ``model`` gets when the manifest does not say."""

    def n_default(self, model: str) -> int:
        """Images one job of ``model`` makes when the manifest does not say."""

    def param_problems(
        self, model: str, *, n: int | None, negative_prompt: str | None, watermark: bool | None
    ) -> list[tuple[str, str]]:
        """(field, message) for every parameter ``model`` does not accept as given."""


def dump_params(negative_prompt: str | None, watermark: bool | None) -> str | None:
    """The ``params`` column's JSON for the optional parameters given, ``None`` for none.

    >>> dump_params("blurry", None)
    '{"negative_prompt":"blurry"}'
    """
    given: dict[str, object] = {}
    if negative_prompt is not None:
        given["negative_prompt"] = negative_prompt
    if watermark is not None:
        given["watermark"] = watermark
    if not given:
        return None
    return json.dumps(given, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def load_params(text: str | None) -> dict[str, object]:
    """The optional parameters stored in a ``params`` column (``{}`` for ``None``)."""
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
