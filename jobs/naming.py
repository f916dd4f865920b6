"""Output paths: templates rendered into safe, relative file names below the run folder.

The rules, in the order they apply:

- Only the template's own ``/`` make folders. Every value substituted into it is made safe as
  part of a single component: Unicode NFC, and ``/``, ``\\``, the characters common file systems
  refuse (``<>:"|?*``) and control characters become ``_``.
- The template itself may not be absolute, start with a drive letter, contain ``\\``, or have a
  ``.``/``..`` component; after rendering, a component that is ``.``, ``..`` or only dots is
  refused too. Escaping the output folder is an error, never silently fixed.
- Each component loses trailing dots and spaces, gets ``_`` in front of a Windows device name
  (``CON``, ``NUL``, ``COM1``, ...) and is cut to 255 UTF-8 bytes (the file name keeps its
  ``.png``).
- The path ends in ``.png``: appended when the template's file name has no extension, an error
  for any other extension. ``metadata.jsonl`` at the top is reserved for the run folder.

A job of ``n`` images (``n > 1``) writes them next to its output path, numbered from 1 by
their place in the service's answer: ``cat.png`` with ``n: 3`` is ``cat-1.png``, ``cat-2.png``
and ``cat-3.png`` (:func:`image_output`). A job of one image keeps its output path as it is.

``render`` returns the path and its collision key (the case-folded path), so two jobs whose
files would be the same on a case-insensitive file system can be refused up front::

    >>> compile_output("{category}/{id}").render({"category": "a/b", "id": "CON"})
    ('a_b/_CON.png', 'a_b/_con.png')
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from jobs.templates import Scalar, Template, compile_template

__all__ = [
    "DEFAULT_OUTPUT",
    "MAX_COMPONENT_BYTES",
    "OutputTemplate",
    "compile_output",
    "image_output",
    "safe_component",
]

DEFAULT_OUTPUT = "{id}.png"
MAX_COMPONENT_BYTES = 255
RESERVED_TOP = "metadata.jsonl"

_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{stem}{n}" for stem in ("COM", "LPT") for n in [*"123456789", "¹", "²", "³"]]
)
_DEVICE_PREFIXES = frozenset(name[:3] for name in _DEVICES)
_DEVICE_INITIALS = "CPANLcpanl"
_REFUSED = '<>:"|?*\\'
# Literal template text keeps its "/"; substituted values lose theirs.
_LITERAL_TABLE = {ord(c): "_" for c in _REFUSED} | {c: "_" for c in [*range(32), *range(127, 160)]}
_VALUE_TABLE = _LITERAL_TABLE | {ord("/"): "_"}
_REFUSED_ASCII = re.compile(r'[\x00-\x1f\x7f<>:"|?*\\/]')
_DRIVE = re.compile(r"[A-Za-z]:")
_MARK = "\x00"  # stands for a placeholder while the template's literal shape is checked


def safe_component(value: str) -> str:
    """``value`` made safe as (part of) one path component: NFC, refused characters -> ``_``."""
    if value.isascii():
        # A regex search is several times cheaper than translate on the common clean value.
        return value if _REFUSED_ASCII.search(value) is None else value.translate(_VALUE_TABLE)
    return unicodedata.normalize("NFC", value).translate(_VALUE_TABLE)


@dataclass(frozen=True, kw_only=True, slots=True)
class OutputTemplate:
    """A checked output template; ``render`` turns template values into ``(path, key)``."""

    text: str
    template: Template
    append_png: bool
    # For templates like "{id}.png": the text after the single leading {id}, else None.
    id_suffix: str | None
    # id_suffix is ASCII, has no "/", and ends in ".png".
    id_suffix_plain: bool

    def render(self, values: Mapping[str, Scalar]) -> tuple[str, str]:
        """The relative POSIX path and its collision key; ``ValueError`` if it is unsafe."""
        rendered = self.template.render(values, safe_component)
        return _finish(rendered + ".png" if self.append_png else rendered)

    def render_id(self, job_id: str) -> tuple[str, str]:
        """``render`` for templates that use nothing but a leading ``{id}`` (the default)."""
        assert self.id_suffix is not None
        name = safe_component(job_id) + self.id_suffix
        # The common case needs none of _finish: one ASCII component ending in ".png" (so no
        # trailing dot or space), short, and not a device name.
        if (
            self.id_suffix_plain
            and name.isascii()
            and len(name) <= MAX_COMPONENT_BYTES
            and (name[0] not in _DEVICE_INITIALS or name[:3].upper() not in _DEVICE_PREFIXES)
        ):
            return name, name.lower()
        return _finish(name)


@lru_cache(maxsize=1024)
def compile_output(text: str) -> OutputTemplate:
    """Check an output template's own shape; raises ``ValueError`` with a one-line message."""
    template = compile_template(text)
    skeleton = _MARK.join(literal for literal, _, _ in template.parts) + (
        _MARK if template.parts else ""
    )
    skeleton += template.tail
    if skeleton.startswith("/"):
        raise ValueError(f"{text!r} is an absolute path; it escapes the output folder")
    if _DRIVE.match(skeleton):
        raise ValueError(f"{text!r} starts with a drive letter; it escapes the output folder")
    if "\\" in skeleton:
        raise ValueError(f"{text!r}: use / between folders, not \\")
    components = skeleton.split("/")
    for component in components:
        if not component.strip(". "):
            if "." in component:
                raise ValueError(f"{text!r}: {component!r} escapes the output folder")
            raise ValueError(f"{text!r} has an empty folder or file name")
    name = components[-1]
    if len(components) == 1 and name.casefold() == RESERVED_TOP:
        raise ValueError(f"{text!r}: {RESERVED_TOP} is reserved for the run folder")
    trailing = name.rsplit(_MARK, 1)[-1].rstrip(". ")
    append_png = "." not in trailing
    if not append_png:
        extension = trailing.rsplit(".", 1)[1]
        if extension.lower() != "png":
            raise ValueError(
                f"{text!r}: images are PNG; the name must end in .png, not .{extension}"
            )
    tail = _clean_literal(template.tail)
    clean = Template(
        text=template.text,
        parts=tuple((_clean_literal(lit), name, spec) for lit, name, spec in template.parts),
        tail=tail.rstrip(". ") if append_png else tail,
        names=template.names,
    )
    simple = len(clean.parts) == 1 and clean.parts[0] == ("", "id", "") and "/" not in clean.tail
    id_suffix = (clean.tail + ".png" if append_png else clean.tail) if simple else None
    return OutputTemplate(
        text=text,
        template=clean,
        append_png=append_png,
        id_suffix=id_suffix,
        id_suffix_plain=bool(id_suffix and id_suffix.isascii() and id_suffix.endswith(".png")),
    )


def _clean_literal(text: str) -> str:
    return unicodedata.normalize("NFC", text).translate(_LITERAL_TABLE)


def _finish(rendered: str) -> tuple[str, str]:
    """Check and normalise every component of a rendered path; return (path, key)."""
    if not rendered.isascii():
        rendered = unicodedata.normalize("NFC", rendered)
    components = rendered.split("/")
    last = len(components) - 1
    for i, component in enumerate(components):
        name = component.rstrip(". ")
        if not name:
            if "." in component:
                raise ValueError(f"{component!r} escapes the output folder")
            raise ValueError(f"{rendered!r} has an empty folder or file name (an empty value?)")
        if len(name) >= 3 and name[:3].upper() in _DEVICE_PREFIXES:
            stem = name.split(".", 1)[0].rstrip(" ").upper()
            if stem in _DEVICES:
                name = "_" + name
        if len(name) * 4 > MAX_COMPONENT_BYTES and len(name.encode()) > MAX_COMPONENT_BYTES:
            name = _shorten(name, keep=4 if i == last else 0)
        components[i] = name
    if last == 0 and components[0].casefold() == RESERVED_TOP:
        raise ValueError(f"{RESERVED_TOP} is reserved for the run folder")
    path = "/".join(components)
    return path, path.lower() if path.isascii() else path.casefold()


def _shorten(name: str, *, keep: int) -> str:
    """Cut ``name`` to MAX_COMPONENT_BYTES UTF-8 bytes, keeping its last ``keep`` characters."""
    suffix = name[len(name) - keep :] if keep else ""
    stem = name[: len(name) - keep] if keep else name
    budget = MAX_COMPONENT_BYTES - len(suffix.encode())
    while True:
        cut = stem.encode()[:budget].decode("utf-8", "ignore")
        cut = unicodedata.normalize("NFC", cut).rstrip(". ")
        if len(cut.encode()) <= budget:
            break
        budget -= 1
    if not cut:
        raise ValueError(f"{name[:40]!r}... is too long for a file name")
    return cut + suffix


def image_output(output: str, index: int, n: int) -> str:
    """The file of image ``index`` (1..n) of a job whose output path is ``output``.

    ``output`` itself when the job makes one image; otherwise ``-<index>`` before ``.png``
    (the stem cut, if need be, to keep the file name within 255 bytes).

    >>> image_output("cats/tabby.png", 2, 4), image_output("cats/tabby.png", 1, 1)
    ('cats/tabby-2.png', 'cats/tabby.png')
    """
    if n == 1:
        return output
    folder, slash, name = output.rpartition("/")
    stem = name[: -len(".png")] if name.lower().endswith(".png") else name
    suffix = f"-{index}{name[len(stem) :] or '.png'}"
    budget = MAX_COMPONENT_BYTES - len(suffix.encode())
    if len(stem.encode()) > budget:
        stem = stem.encode()[:budget].decode("utf-8", "ignore").rstrip(". ")
    return f"{folder}{slash}{stem}{suffix}"
