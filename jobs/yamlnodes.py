"""Safe, located access to YAML nodes: the part of YAML reading that knows nothing of jobs.

``compose`` turns text into a node tree through ``yaml.SafeLoader`` without constructing
anything. ``Nodes`` then reads mappings and scalars from that tree: a scalar is built by the
safe constructor only for the standard tags (str, int, float, bool, null, timestamp), so a
``!!python/object`` or any other tag becomes a located error instead of an object. Every
problem is appended to an error list as a one-line ``ManifestError`` with the node's line.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from jobs.errors import ManifestError
from jobs.fields import BUILTIN_VARS, one_line, text_problem, variants_problem
from jobs.templates import Scalar

__all__ = [
    "MAP",
    "SEQ",
    "FieldValue",
    "Nodes",
    "Value",
    "as_var",
    "compose",
    "decode",
    "kind_of",
    "line_of",
]

FieldValue = str | int | bool | None
_STD = "tag:yaml.org,2002:"
MAP = _STD + "map"
SEQ = _STD + "seq"
_SCALAR_TAGS = frozenset(_STD + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_SAFE = yaml.constructor.SafeConstructor()
_FIELD_TYPES = {
    "id": "a string or an integer",
    "model": "a model name",
    "prompt": "text",
    "negative_prompt": "text",
    "n": "a whole number",
    "watermark": "true or false",
    "size": "text such as 1024*1536 or 16:9",
    "seed": "a whole number",
    "prompt_extend": "true or false",
    "output": "a path template",
    "variants": "a whole number",
}

_INT_FIELDS = frozenset({"seed", "n", "variants"})
_BOOL_FIELDS = frozenset({"prompt_extend", "watermark"})
_TEXT_FIELDS = frozenset({"id", "model", "prompt", "negative_prompt", "size", "output"})
_WRITTEN_FIELDS = frozenset({"prompt", "negative_prompt", "size"})


@dataclass(frozen=True, kw_only=True, slots=True)
class Value:
    """One scalar: its constructed value, the text as written, and its line."""

    value: object
    text: str
    line: int
    typed: bool  # resolved to something other than a string (int, bool, date, ...)


def line_of(node: Node) -> int:
    """The 1-based line where ``node`` starts."""
    return int(node.start_mark.line) + 1


class Nodes:
    """Typed access to nodes, appending a located error for anything unexpected."""

    def __init__(self, path: str, errors: list[ManifestError]) -> None:
        self.path = path
        self.errors = errors

    def error(self, line: int | None, field: str | None, message: str) -> None:
        field = one_line(field) if field else field
        self.errors.append(ManifestError(self.path, line, field, one_line(message)))

    def prepare(self, root: Node) -> None:
        """Refuse duplicate keys, then apply merge keys (``<<``) in every mapping, once.

        Applying merges rewrites the nodes (merged pairs go first, so a mapping's own keys
        win), which is why this runs once on load, after every mapping's own keys are checked.
        """
        mappings = [node for node in _reachable(root) if isinstance(node, MappingNode)]
        for node in mappings:
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                    continue  # a merge key, or a key mapping() will refuse where it is used
                line = line_of(key_node)
                if key_node.value in seen:
                    first = seen[key_node.value]
                    self.error(line, key_node.value, f"duplicate key (first on line {first})")
                else:
                    seen[key_node.value] = line
        for node in mappings:
            try:
                _SAFE.flatten_mapping(node)
            except yaml.MarkedYAMLError as exc:
                line = int(exc.problem_mark.line) + 1 if exc.problem_mark else line_of(node)
                self.error(line, "<<", str(exc.problem))

    def mapping(self, node: Node, field: str | None) -> dict[str, tuple[int, Node]] | None:
        """key -> (key line, value node) of a prepared mapping; None if not a mapping."""
        if not isinstance(node, MappingNode) or node.tag != MAP:
            self.error(line_of(node), field, f"expected a mapping, found {kind_of(node)}")
            return None
        out: dict[str, tuple[int, Node]] = {}
        for key_node, value_node in node.value:  # merged pairs first: the mapping's own win
            if not isinstance(key_node, ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                message = f"a key must be plain text, found {kind_of(key_node)}"
                self.error(line_of(key_node), field, message)
            else:
                out[key_node.value] = (line_of(key_node), value_node)
        return out

    def scalar(self, node: Node, field: str) -> Value | None:
        """One scalar of a standard tag (dates as ISO text), or None after an error."""
        if not isinstance(node, ScalarNode):
            self.error(line_of(node), field, f"expected a single value, found {kind_of(node)}")
            return None
        if node.tag not in _SCALAR_TAGS:
            tag = node.tag.replace(_STD, "!!")
            self.error(line_of(node), field, f"tag {tag} is not allowed (safe YAML only)")
            return None
        try:
            value = _SAFE.yaml_constructors[node.tag](_SAFE, node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            self.error(line_of(node), field, f"cannot read {node.value[:40]!r}: {exc}")
            return None
        if isinstance(value, datetime.date):
            value = value.isoformat()
        if isinstance(value, str) and (problem := text_problem(value)):
            self.error(line_of(node), field, problem)
            return None
        typed = node.tag != _STD + "str"
        return Value(value=value, text=str(node.value), line=line_of(node), typed=typed)

    def field(self, name: str, node: Node, label: str | None = None) -> tuple[bool, FieldValue]:
        """(ok, value) for one per-job field (errors name ``label``); null means absent.

        ``seed``, ``n`` and ``variants`` are ints, ``prompt_extend`` and ``watermark`` bools, the
        others text.
        """
        label = label or name
        scalar = self.scalar(node, label)
        if scalar is None:
            return False, None
        value = scalar.value
        if value is None:
            return True, None
        if name in _INT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            if name == "variants" and (problem := variants_problem(value)):
                self.error(scalar.line, label, problem)
                return False, None
            return True, value
        if name in _BOOL_FIELDS and isinstance(value, bool):
            return True, value
        if name in _TEXT_FIELDS and isinstance(value, str):
            return True, value if not scalar.typed else scalar.text  # a date: as written
        written = name in _WRITTEN_FIELDS or (name == "id" and isinstance(value, int))
        if written and not isinstance(value, bool):
            return True, scalar.text  # 16:9 (base 60 to YAML 1.1) and 007 mean what was written
        self.error(scalar.line, label, f"must be {_FIELD_TYPES[name]}, not {scalar.text[:40]!r}")
        return False, None

    def variables(self, node: Node, field: str) -> dict[str, Scalar] | None:
        """A ``vars`` mapping of template variables, or None if it is not a mapping."""
        entries = self.mapping(node, field)
        if entries is None:
            return None
        out: dict[str, Scalar] = {}
        for name, (line, value_node) in entries.items():
            scalar = self.scalar(value_node, f"{field}.{name}")
            if scalar is None:
                continue
            if name in BUILTIN_VARS:
                self.error(line, f"{field}.{name}", "reserved template variable; rename it")
            elif (var := as_var(scalar.value)) is None:
                self.error(line, f"{field}.{name}", "must be a string, number or boolean")
            else:
                out[name] = var
        return out


def _reachable(root: Node) -> list[Node]:
    """Every node under ``root`` once (an alias shares its anchor's node), without recursion."""
    seen: set[int] = set()
    found: list[Node] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        if isinstance(node, MappingNode):
            stack.extend(part for pair in node.value for part in pair)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)
    return found


def as_var(value: object) -> Scalar | None:
    """A template variable's value (booleans as "true"/"false"), or None if it cannot be one."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return None


def kind_of(node: Node) -> str:
    """What ``node`` is, for a message ("a list", "tag !!python/object:...")."""
    if node.tag not in _SCALAR_TAGS and node.tag not in (MAP, SEQ):
        return f"tag {node.tag.replace(_STD, '!!')}"
    names = {MappingNode: "a mapping", SequenceNode: "a list", ScalarNode: "a single value"}
    return names.get(type(node), "something else")


def decode(data: bytes, path: str) -> str:
    """The manifest's bytes as text: UTF-8 with or without BOM; anything else is located."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(path, 1, "encoding", "UTF-16 text; save the file as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ManifestError(
            path,
            data.count(b"\n", 0, nul) + 1,
            "encoding",
            "NUL byte: not a UTF-8 text file (UTF-16? binary?); save it as UTF-8",
        )
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise ManifestError(
            path,
            data.count(b"\n", 0, exc.start) + 1,
            "encoding",
            f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8",
        ) from None


def compose(text: str, path: str) -> Node | None:
    """The document's node tree (None if it is empty); a syntax error is raised, located."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character up front
        return loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = str(exc.problem or "invalid YAML")
        if exc.context:
            message += f" ({exc.context})"
        line = int(mark.line) + 1 if mark is not None else None
        raise ManifestError(path, line, "yaml", one_line(message)) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        message = f"character {chr(exc.character)!r} is not allowed in YAML"
        raise ManifestError(path, line, "yaml", one_line(message)) from None
    except RecursionError:
        raise ManifestError(path, None, "yaml", "nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
