"""The manifest's per-model checks, answered from the model registry.

``RULES`` is what batcher hands :func:`jobs.manifest.open_manifest` (see ``jobs.params``): the
manifest readers know the syntax, these rules know each model's sizes, limits and parameters.
Messages are one line and, where it helps, name the models a value would suit::

    >>> RULES.size("qwen-image", "16:9")
    ('1664*928', 1664, 928)
    >>> RULES.size("qwen-image-max", "1:1")
    ('1328*1328', 1328, 1328)
    >>> RULES.size("wan2.2-t2i-plus", "2048*512")
    Traceback (most recent call last):
    ...
    ValueError: 2048*512: each side must be in 512..1440 for wan2.2-t2i-plus; it suits z-image...
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from batcher.models import DEFAULT_MODEL, MODELS, Model, UnknownModel, model
from jobs.sizes import Pixels, read_size

__all__ = ["RULES", "RegistryRules", "resolve_size"]

_PACKAGE = str(Path(__file__).resolve().parent.parent)


def resolve_size(entry: Model, written: str | None) -> tuple[str, int, int]:
    """The ``W*H`` a written size means for ``entry`` (its default for ``None``)."""
    if written is None:
        text = entry.sizes.default
        width, height = text.split("*")
        return text, int(width), int(height)
    size = read_size(written)
    policy = entry.sizes
    if isinstance(size, Pixels):
        problem = policy.problem(size.width, size.height)
        if problem is None:
            return size.text, size.width, size.height
        others = [m.name for m in MODELS.values() if not m.sizes.problem(size.width, size.height)]
        if policy.table:
            problem = f"{size.text} is not a {entry.name} size (one of {', '.join(policy.table)})"
        else:
            problem = f"{problem} for {entry.name}"
        suits = f"; it suits {', '.join(others)}" if others else ""
        raise ValueError(problem + suits)
    sizes = policy.ratios.get(size.ratio)
    if sizes is None:
        others = [m.name for m in MODELS.values() if size.ratio in m.sizes.ratios]
        verb = "has" if len(others) == 1 else "have"
        suits = f" ({', '.join(others)} {verb} it)" if others else ""
        raise ValueError(
            f"{size.ratio} is not an aspect ratio {entry.name} knows{suits}; use one of "
            f"{', '.join(policy.ratios)}, or W*H"
        )
    tier = size.tier or policy.default_tier
    if tier not in policy.tiers:
        tiers = ", ".join("@" + t for t in policy.tiers)
        tiers = " or ".join(tiers.rsplit(", ", 1))
        raise ValueError(f"@{tier}: the pixel tier of {entry.name} must be {tiers}")
    text = sizes[policy.tiers.index(tier)]
    width, height = text.split("*")
    return text, int(width), int(height)


class RegistryRules:
    """``jobs.params.ModelRules`` answered from ``batcher.models.MODELS``."""

    @property
    def default_model(self) -> str:
        return DEFAULT_MODEL

    @property
    def reference(self) -> tuple[str, str, str] | None:
        return (_PACKAGE, "batcher.modelrules", "RULES")

    def model_problem(self, model_name: str) -> str | None:
        try:
            model(model_name)
        except UnknownModel as exc:
            return str(exc)
        return None

    def size(self, model_name: str, written: str | None) -> tuple[str, int, int]:
        return _size(model_name, written)

    def prompt_limit(self, model_name: str) -> int:
        return model(model_name).prompt_limit

    def prompt_extend_default(self, model_name: str) -> bool:
        return model(model_name).prompt_extend_default

    def n_default(self, model_name: str) -> int:
        return model(model_name).n_default

    def param_problems(
        self, model_name: str, *, n: int | None, negative_prompt: str | None, watermark: bool | None
    ) -> list[tuple[str, str]]:
        entry = model(model_name)
        problems: list[tuple[str, str]] = []
        if n is not None and not entry.n_min <= n <= entry.n_max:
            if entry.n_max == 1:
                takers = [m.name for m in MODELS.values() if m.n_max >= n >= m.n_min]
                hint = f" (several images a call: {', '.join(takers)})" if takers else ""
                problems.append(("n", f"{entry.name} makes 1 image a call, not {n}{hint}"))
            else:
                problems.append(
                    (
                        "n",
                        f"{n} is outside {entry.n_min}..{entry.n_max} for {entry.name} "
                        f"(it makes {entry.n_min} to {entry.n_max} images a call)",
                    )
                )
        if negative_prompt is not None:
            limit = entry.negative_prompt_limit
            if limit is None:
                problems.append(("negative_prompt", f"{entry.name} takes no negative prompt"))
            elif len(negative_prompt) > limit:
                problems.append(
                    (
                        "negative_prompt",
                        f"{len(negative_prompt)} characters; {entry.name} takes at most {limit}",
                    )
                )
        if watermark is not None and not entry.watermark:
            problems.append(("watermark", f"{entry.name} has no watermark option"))
        return problems


@lru_cache(maxsize=4096)
def _size(model_name: str, written: str | None) -> tuple[str, int, int]:
    return resolve_size(model(model_name), written)


RULES = RegistryRules()
