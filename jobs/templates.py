"""Placeholders in prompts and output paths.

A template is text with ``{name}`` placeholders, each optionally with a format spec
(``{index:04d}``); ``{{`` and ``}}`` are literal braces. Only plain identifiers may be named:
attribute or index access (``{id.__class__}``, ``{x[0]}``), positional fields (``{}``, ``{0}``),
conversions (``{x!r}``) and nested placeholders in a spec are refused when the template is
compiled, so rendering can never reach into an object::

    >>> compile_template("{category}/{id}-{index:03d}.png").render(
    ...     {"category": "shoes", "id": "sku-1", "index": 7})
    'shoes/sku-1-007.png'

Errors are ``TemplateError`` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Scalar", "Template", "TemplateError", "compile_template", "has_placeholders"]

Scalar = str | int | float
_parse = string.Formatter().parse
_MAX_LISTED = 30


class TemplateError(ValueError):
    """A template is malformed or names a variable that has no value."""


def has_placeholders(text: str) -> bool:
    """Whether ``text`` needs compiling at all (a cheap test for the common case)."""
    return "{" in text or "}" in text


@dataclass(frozen=True, kw_only=True, slots=True)
class Template:
    """A compiled template: literal text interleaved with named placeholders.

    ``parts`` holds ``(literal, name, spec)`` triples in order; ``tail`` is the literal text
    after the last placeholder; ``names`` is the set of variables the template uses.
    """

    text: str
    parts: tuple[tuple[str, str, str], ...]
    tail: str
    names: frozenset[str]

    def render(
        self, values: Mapping[str, Scalar], transform: Callable[[str], str] | None = None
    ) -> str:
        """Substitute ``values``; ``transform`` (if given) is applied to each substituted text.

        Raises ``TemplateError`` for a variable with no value or a spec that does not fit it.
        """
        out: list[str] = []
        for literal, name, spec in self.parts:
            try:
                value = values[name]
            except KeyError:
                raise TemplateError(unknown_variable(name, values)) from None
            if spec:
                try:
                    text = format(value, spec)
                except (ValueError, TypeError) as exc:
                    raise TemplateError(f"{{{name}:{spec}}}: {exc}") from None
            else:
                text = value if type(value) is str else str(value)
            out.append(literal)
            out.append(text if transform is None else transform(text))
        out.append(self.tail)
        return "".join(out)


def unknown_variable(name: str, values: Mapping[str, object]) -> str:
    """The message for a placeholder that has no value, listing what is available."""
    names = sorted(values)
    listed = ", ".join(names[:_MAX_LISTED]) + (", ..." if len(names) > _MAX_LISTED else "")
    return f"unknown variable {{{name}}}; available: {listed or '(none)'}"


@lru_cache(maxsize=4096)
def compile_template(text: str) -> Template:
    """Parse and check ``text``; raises ``TemplateError`` if it is malformed."""
    try:
        pieces = list(_parse(text))
    except ValueError as exc:
        raise TemplateError(f"{exc}; write {{{{ or }}}} for a literal brace") from None
    parts: list[tuple[str, str, str]] = []
    literal = ""
    for chunk, name, spec, conversion in pieces:
        literal += chunk
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + "}"
        if name == "" or name.isdigit():
            raise TemplateError(f"{shown}: name a variable, e.g. {{id}}")
        if not name.isidentifier():
            raise TemplateError(
                f"{shown}: only plain variable names are allowed (no attributes, indexes or spaces)"
            )
        if conversion is not None:
            raise TemplateError(f"{shown}: conversions such as !r are not allowed")
        if spec and ("{" in spec or "}" in spec):
            raise TemplateError(f"{{{name}:{spec}}}: placeholders inside a format spec")
        parts.append((literal, name, spec or ""))
        literal = ""
    return Template(
        text=text,
        parts=tuple(parts),
        tail=literal,
        names=frozenset(name for _, name, _ in parts),
    )
