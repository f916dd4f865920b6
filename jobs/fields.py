"""The vocabulary of a manifest job: its field names, limits, and small shared rules.

Used by every format reader and by ``jobs.builder``: which keys are fields and which are
template variables, the words a boolean may be written as, near-miss suggestions for unknown
keys, and keeping every message on one line.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from functools import lru_cache

__all__ = [
    "BUILTIN_VARS",
    "FIELDS",
    "MAX_ID_CHARS",
    "MAX_N",
    "MAX_SEED",
    "MAX_VARIANTS",
    "ROW_FIELDS",
    "ROW_FIELD_SET",
    "extra_key_problem",
    "one_line",
    "parse_bool_text",
    "suggest",
    "text_problem",
    "variants_problem",
]

FIELDS = (
    "id",
    "model",
    "prompt",
    "negative_prompt",
    "size",
    "n",
    "seed",
    "prompt_extend",
    "watermark",
    "output",
    "variants",
    "vars",
)
ROW_FIELDS = FIELDS[:-1]  # "vars" is YAML's; in CSV/JSONL other columns/keys are the vars
ROW_FIELD_SET = frozenset(ROW_FIELDS)
BUILTIN_VARS = frozenset({"id", "model", "seed", "size", "width", "height", "index"})
MAX_SEED = 2_147_483_647
MAX_VARIANTS = 1000
MAX_ID_CHARS = 512
MAX_N = 100  # a syntax bound only; each model's own range is checked by the caller's rules
_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_bool_text(text: str) -> bool | None:
    """``true/false/1/0/yes/no`` (any case) as a bool; ``None`` if it is none of them."""
    return _BOOLS.get(text.strip().lower())


def suggest(name: str, candidates: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the nearest candidate, or ``""``."""
    options = list(candidates)
    folded = [c for c in options if c.casefold() == name.casefold()]
    match = folded or difflib.get_close_matches(name, options, n=1, cutoff=0.75)
    return f"; did you mean {match[0]}?" if match else ""


@lru_cache(maxsize=1024)
def extra_key_problem(name: str, present: frozenset[str], noun: str = "field") -> str | None:
    """Why a CSV column or JSONL key that is not a field may not be a variable, or None.

    A builtin variable's name is reserved; a near miss of a field the row does not have
    (``promt`` without ``prompt``) is taken for a typo.
    """
    if name in BUILTIN_VARS:
        return f"reserved template variable; rename the {noun}"
    hint = suggest(name, [f for f in ROW_FIELDS if f not in present])
    return f"unknown {noun}{hint}" if hint else None


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as UTF-8 (an unpaired surrogate from a JSON/YAML escape)."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"contains an unpaired surrogate {text[exc.start]!r}"
    return None


def variants_problem(value: object) -> str | None:
    """Why ``value`` is not a count of variants (a whole number 1..MAX_VARIANTS), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be a whole number from 1 to {MAX_VARIANTS}"
    if not 1 <= value <= MAX_VARIANTS:
        return f"{value} is outside 1..{MAX_VARIANTS}"
    return None


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
