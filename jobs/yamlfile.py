"""YAML manifests: the top level and the jobs, fanned out over the matrix.

Read through ``yaml.SafeLoader`` only (see ``jobs.yamlnodes``), so every job and field keeps
its line, duplicate keys are refused, no tag can construct an object, and ``16:9`` (a base-60
integer to YAML 1.1) or ``007`` mean the text that was written where text is expected.

Top level: ``model`` (one the caller's ``jobs.params.ModelRules`` knows; a job or ``defaults``
may name another), ``defaults`` (any per-job field but ``id``),
``output`` (the path template), ``matrix`` and ``jobs``. ``load_yaml`` checks everything but
the jobs, so ``Manifest.model`` is known on open; ``iter_yaml`` checks each job as it reaches
it and fans it out over the matrix: the product of the named value lists, in key order. A
matrix key ``model``, ``seed``, ``size``, ``n`` or ``prompt_extend`` sets that field; every
matrix value is a template variable; the job's id gets the values appended
(``sku-001`` -> ``sku-001-studio``). Without an ``output`` template each file is named
after that full id. ``variants: N`` (in ``defaults`` or on a job) makes N jobs of each
combination, ``-v1``..``-vN``; a job's written seed is spread over its combinations and
variants, one seed each (see ``jobs.builder``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from yaml.nodes import Node, SequenceNode

from jobs.builder import JobBuilder
from jobs.errors import ManifestError, ManifestInvalid
from jobs.fields import BUILTIN_VARS, FIELDS, MAX_SEED, suggest
from jobs.naming import DEFAULT_OUTPUT, OutputTemplate, compile_output
from jobs.params import ModelRules
from jobs.sizes import read_size
from jobs.spec import JobRow
from jobs.templates import Scalar
from jobs.yamlnodes import SEQ, FieldValue, Nodes, as_var, compose, decode, kind_of, line_of

__all__ = ["MAX_COMBINATIONS", "MAX_YAML_BYTES", "YamlManifest", "iter_yaml", "load_yaml"]

MAX_YAML_BYTES = 50 << 20
MAX_COMBINATIONS = 1_000_000
TOP_KEYS = ("model", "defaults", "output", "matrix", "jobs")
MATRIX_FIELDS = frozenset({"model", "seed", "size", "n", "prompt_extend"})


@dataclass(frozen=True, kw_only=True, slots=True)
class Entry:
    """One matrix value: what templates see, what the id gets, and the field it sets."""

    var: Scalar
    text: str
    line: int
    sets: FieldValue  # for a key that is a field (MATRIX_FIELDS); else None


@dataclass(frozen=True, kw_only=True, slots=True)
class YamlManifest:
    """A YAML manifest whose top level has been checked; ``jobs`` are still nodes."""

    model: str
    output: OutputTemplate
    output_given: bool
    defaults: Mapping[str, FieldValue]
    default_lines: Mapping[str, int]
    default_vars: Mapping[str, Scalar]
    matrix: tuple[tuple[str, tuple[Entry, ...]], ...]
    jobs: tuple[Node, ...]


def load_yaml(path: Path, shown: str, rules: ModelRules, *, max_errors: int = 20) -> YamlManifest:
    """Read and check a YAML manifest's top level; raises ``ManifestInvalid``."""
    errors: list[ManifestError] = []
    doc = None
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ManifestError(shown, None, None, "over 50 MiB; use CSV or JSONL for big runs")
        root = compose(decode(path.read_bytes(), shown), shown)
        if root is None:
            raise ManifestError(shown, None, None, "empty manifest: no jobs")
        nodes = Nodes(shown, errors)
        nodes.prepare(root)
        doc = _top_level(root, nodes, rules)
    except ManifestError as exc:
        errors.append(exc)
    except OSError as exc:
        errors.append(ManifestError(shown, None, None, f"cannot read: {exc.strerror or exc}"))
    if errors or doc is None:
        errors.sort(key=lambda e: e.line or 0)
        raise ManifestInvalid(errors[:max_errors], truncated=len(errors) > max_errors)
    return doc


def _top_level(root: Node, nodes: Nodes, rules: ModelRules) -> YamlManifest | None:
    top = nodes.mapping(root, None)
    if top is None:
        return None
    for key, (line, _) in top.items():
        if key not in TOP_KEYS:
            if key in FIELDS:
                hint = "; per-job fields go in jobs: or defaults:"
            elif not (hint := suggest(key, TOP_KEYS)) and (hint := suggest(key, FIELDS)):
                hint += " (per-job fields go in jobs: or defaults:)"
            nodes.error(line, key, f"unknown key{hint}")
    model = rules.default_model
    if "model" in top and (value := nodes.scalar(top["model"][1], "model")) is not None:
        model = value.text
        if (problem := rules.model_problem(model)) is not None:
            nodes.error(value.line, "model", problem)
    output = compile_output(DEFAULT_OUTPUT)
    if "output" in top:
        ok, text = nodes.field("output", top["output"][1])
        if ok and text is not None:
            try:
                output = compile_output(str(text))
            except ValueError as exc:
                nodes.error(line_of(top["output"][1]), "output", str(exc))
    defaults, default_lines, default_vars = _defaults(top, nodes)
    matrix = _matrix(top["matrix"][1], nodes) if "matrix" in top else ()
    jobs: tuple[Node, ...] = ()
    if "jobs" not in top:
        nodes.error(line_of(root), "jobs", "missing; list the jobs under jobs:")
    elif not isinstance(node := top["jobs"][1], SequenceNode) or node.tag != SEQ:
        nodes.error(line_of(node), "jobs", f"expected a list of jobs, found {kind_of(node)}")
    elif not node.value:
        nodes.error(line_of(node), "jobs", "empty manifest: no jobs")
    else:
        jobs = tuple(node.value)
    if nodes.errors:
        return None
    return YamlManifest(
        model=model,
        output=output,
        output_given="output" in top,
        defaults=defaults,
        default_lines=default_lines,
        default_vars=default_vars,
        matrix=matrix,
        jobs=jobs,
    )


def _defaults(
    top: Mapping[str, tuple[int, Node]], nodes: Nodes
) -> tuple[dict[str, FieldValue], dict[str, int], dict[str, Scalar]]:
    values: dict[str, FieldValue] = {}
    lines: dict[str, int] = {}
    variables: dict[str, Scalar] = {}
    entries = nodes.mapping(top["defaults"][1], "defaults") if "defaults" in top else {}
    for name, (line, node) in (entries or {}).items():
        if name == "id":
            nodes.error(line, "id", "cannot have a default; ids must differ")
        elif name == "vars":
            variables = nodes.variables(node, "vars") or {}
        elif name not in FIELDS:
            nodes.error(line, name, f"unknown field{suggest(name, FIELDS)}")
        else:
            ok, value = nodes.field(name, node)
            if ok and value is not None:
                values[name] = value
                lines[name] = line_of(node)
    return values, lines, variables


def _matrix(node: Node, nodes: Nodes) -> tuple[tuple[str, tuple[Entry, ...]], ...]:
    entries = nodes.mapping(node, "matrix")
    matrix: list[tuple[str, tuple[Entry, ...]]] = []
    combinations = 1
    for name, (line, list_node) in (entries or {}).items():
        field = f"matrix.{name}"
        variable = name.isidentifier() and name not in BUILTIN_VARS and name not in FIELDS
        if not variable and name not in MATRIX_FIELDS:
            nodes.error(
                line, field, "a matrix varies model, seed, size, n, prompt_extend or a variable"
            )
            continue
        if not isinstance(list_node, SequenceNode) or list_node.tag != SEQ:
            nodes.error(line_of(list_node), field, f"expected a list, found {kind_of(list_node)}")
            continue
        if not list_node.value:
            nodes.error(line_of(list_node), field, "empty list")
            continue
        values: list[Entry] = []
        for item in list_node.value:
            value = _matrix_value(name, item, nodes, field)
            if value is None:
                continue
            if any(v.text == value.text for v in values):
                nodes.error(value.line, field, f"{value.text!r} is listed twice")
                continue
            values.append(value)
        combinations *= max(len(values), 1)
        matrix.append((name, tuple(values)))
    if combinations > MAX_COMBINATIONS:
        message = f"{combinations} combinations; at most {MAX_COMBINATIONS}"
        nodes.error(line_of(node), "matrix", message)
    return tuple(matrix)


def _matrix_value(name: str, item: Node, nodes: Nodes, field: str) -> Entry | None:
    """One matrix value, checked like the field it sets (model, seed, size, n, prompt_extend)."""
    if name in MATRIX_FIELDS:
        ok, value = nodes.field(name, item, field)
        if not ok:
            return None
        if value is None:
            nodes.error(line_of(item), field, "null is not a value")
            return None
        if isinstance(value, int) and not 0 <= value <= MAX_SEED:
            nodes.error(line_of(item), field, f"{value} is outside 0..{MAX_SEED}")
            return None
        if name == "size":  # the job's model decides whether it takes the size
            try:
                read_size(str(value))
            except ValueError as exc:
                nodes.error(line_of(item), field, str(exc))
                return None
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        var: Scalar = value if isinstance(value, int) and not isinstance(value, bool) else text
        return Entry(var=var, text=text, line=line_of(item), sets=value)
    scalar = nodes.scalar(item, field)
    if scalar is None:
        return None
    as_value = as_var(scalar.value)
    if as_value is None:
        nodes.error(scalar.line, field, "must be a string, number or boolean")
        return None
    text = as_value if isinstance(as_value, str) else scalar.text
    return Entry(var=as_value, text=text, line=scalar.line, sets=None)


def iter_yaml(
    doc: YamlManifest, path: str, builder: JobBuilder, errors: list[ManifestError]
) -> Iterator[JobRow | None]:
    """The jobs of a checked YAML manifest, each fanned out over the matrix."""
    nodes = Nodes(path, errors)
    names = [name for name, _ in doc.matrix]
    lists = [values for _, values in doc.matrix]
    index = 0
    for node in doc.jobs:
        line = line_of(node)
        job = _job(node, doc, nodes)
        if job is None:
            yield None
            continue
        fields, lines, variables = job
        count = fields.get("variants")
        count = count if isinstance(count, int) and not isinstance(count, bool) else 1
        seed_by_matrix = "seed" in names
        for number, combination in enumerate(itertools.product(*lists)):
            index += 1
            chosen = dict(fields)
            merged = dict(variables)
            for name, entry in zip(names, combination, strict=True):
                merged[name] = entry.var
                if entry.sets is not None:
                    chosen[name] = entry.sets
            seed = chosen.get("seed")
            extend = chosen.get("prompt_extend")
            images = chosen.get("n")
            watermark = chosen.get("watermark")
            for k in range(1, count + 1):
                # one seed per job of the row: a matrix seed is each combination's own
                offset = k - 1 if seed_by_matrix else number * count + k - 1
                yield builder.build(
                    errors,
                    line,
                    index,
                    _text(chosen, "id"),
                    _text(chosen, "prompt"),
                    _text(chosen, "size"),
                    seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                    extend if isinstance(extend, bool) else None,
                    _text(chosen, "output"),
                    merged,
                    lines,
                    "".join("-" + entry.text for entry in combination),
                    k if count > 1 else 0,
                    offset,
                    model=_text(chosen, "model"),
                    n=images if isinstance(images, int) and not isinstance(images, bool) else None,
                    negative_prompt=_text(chosen, "negative_prompt"),
                    watermark=watermark if isinstance(watermark, bool) else None,
                )


def _text(fields: Mapping[str, FieldValue], name: str) -> str | None:
    value = fields.get(name)
    return value if isinstance(value, str) else None


def _job(
    node: Node, doc: YamlManifest, nodes: Nodes
) -> tuple[dict[str, FieldValue], dict[str, int], dict[str, Scalar]] | None:
    """One job's fields over the defaults, their lines, and its variables; None on errors."""
    before = len(nodes.errors)
    entries = nodes.mapping(node, "job")
    if entries is None:
        return None
    matrix_names = {name for name, _ in doc.matrix}
    fields = dict(doc.defaults)
    lines = dict(doc.default_lines)
    variables = dict(doc.default_vars)
    for name, (line, value_node) in entries.items():
        if name == "vars":
            for var, scalar in (nodes.variables(value_node, "vars") or {}).items():
                if var in matrix_names:
                    nodes.error(line, f"vars.{var}", f"also a matrix key (matrix.{var})")
                variables[var] = scalar
        elif name not in FIELDS:
            nodes.error(line, name, f"unknown field{suggest(name, FIELDS)}")
        elif name in matrix_names:
            nodes.error(line, name, f"also set by the matrix (matrix.{name})")
        else:
            ok, value = nodes.field(name, value_node)
            if ok and value is not None:
                fields[name] = value
                lines[name] = line_of(value_node)
    if len(nodes.errors) > before:
        return None
    return fields, lines, variables
