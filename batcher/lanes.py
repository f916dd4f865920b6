"""Lanes: the API keys (accounts) a run sends through, each paced on its own.

The service counts requests per account *and model*, so a team with several accounts can run
each at its own quota. A lane is one key, named: where it sends (``region`` or ``base_url``),
its quota (requests/s, or a rate per model), the models it serves and a weight. Without
``--lanes`` a run has one lane, ``default``: ``DASHSCOPE_API_KEY`` at ``--region`` /
``--base-url``, as it always did.

A lanes file names the *environment variable* that holds each key (``key_env``), never the
key: a field that looks like a key is refused, and so is a ``key_env`` whose value looks like
one. The file is read with the safe YAML loader; its first problem is one line,
``lanes.yaml:LINE: field: message``::

    lanes:
      - name: team-a
        key_env: DASHSCOPE_KEY_A
        region: intl
        quota: 2
      - name: team-b
        key_env: DASHSCOPE_KEY_B
        region: cn
        quota: {z-image-turbo: 2, qwen-image-max: 0.5}
        models: [z-image-turbo, qwen-image-max]
        weight: 2
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yaml.nodes import Node, SequenceNode

from jobs.errors import ManifestError
from jobs.yamlnodes import Nodes, compose, decode

from .errors import ConfigError, LanesInvalid
from .models import MODELS

__all__ = [
    "DEFAULT_LANE",
    "Lane",
    "LanesInvalid",
    "default_lane",
    "lane_keys",
    "load_lanes",
    "rehearsal_keys",
]

DEFAULT_LANE = "default"
"""The one lane of a run without ``--lanes``."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_FIELDS = ("name", "key_env", "region", "base_url", "quota", "models", "weight")
# Fields that would hold a key itself: refused, whatever their value (never echoed).
_KEY_FIELDS = frozenset(
    {"key", "api_key", "apikey", "api-key", "secret", "token", "dashscope_api_key", "password"}
)
_KEY_LIKE = re.compile(r"(?i)^\s*(sk-|bearer\s)")
_REGIONS = ("intl", "cn")


@dataclass(frozen=True, kw_only=True, slots=True)
class Lane:
    """One API key a run sends through: its name (what the run folder records, never the
    key), the environment variable holding the key, where it sends and how fast.

    ``quota`` None paces each model at the run's own rate (``--rps``, else the model's
    published quota): the default lane. ``model_quota`` gives listed models their own rate.
    ``models`` None serves every model.

    >>> lane = Lane(name="a", key_env="K", quota=2.0, model_quota={"qwen-image-max": 0.5})
    >>> lane.rate_for("z-image-turbo", 9.0), lane.rate_for("qwen-image-max", 9.0)
    (2.0, 0.5)
    """

    name: str
    key_env: str
    region: str = "intl"
    base_url: str | None = None
    quota: float | None = None
    model_quota: Mapping[str, float] = field(default_factory=dict)
    models: frozenset[str] | None = None
    weight: float = 1.0

    def serves(self, model: str) -> bool:
        """Whether this lane may send ``model``'s jobs."""
        return self.models is None or model in self.models

    def rate_for(self, model: str, fallback: float) -> float:
        """The lane's requests/s for ``model``: its own rate for the model, else its quota,
        else ``fallback`` (the run's rate for the model)."""
        if model in self.model_quota:
            return self.model_quota[model]
        if self.quota is not None:
            return self.quota
        if self.model_quota:  # a per-model mapping: other models at their published quota
            entry = MODELS.get(model)
            return entry.quota.rps if entry is not None else fallback
        return fallback


def default_lane(region: str, base_url: str | None) -> Lane:
    """The lane of a run without ``--lanes``: ``DASHSCOPE_API_KEY`` at ``--region`` /
    ``--base-url``, paced at the run's own rates."""
    return Lane(name=DEFAULT_LANE, key_env="DASHSCOPE_API_KEY", region=region, base_url=base_url)


def lane_keys(lanes: Sequence[Lane], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each lane's key, read from its environment variable. A variable that is unset or empty
    is one line naming the lane and the variable (never a value)."""
    env = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    for lane in lanes:
        key = env.get(lane.key_env, "").strip()
        if not key:
            raise ConfigError(
                f"lane {lane.name!r}: the environment variable {lane.key_env} is not set; "
                "export the lane's key in it (a key never goes in the lanes file), "
                "or use --emulate to rehearse offline"
            )
        keys[lane.name] = key
    return keys


def rehearsal_keys(lanes: Sequence[Lane]) -> dict[str, str]:
    """Keys for a rehearsal (``--emulate``): one made up per environment variable named, so
    lanes that name the same variable share an emulated account, as they would share the real
    one. The real keys are not read: a rehearsal needs none, and sends none anywhere."""
    made: dict[str, str] = {}
    keys: dict[str, str] = {}
    for lane in lanes:
        if lane.key_env not in made:
            made[lane.key_env] = f"sk-rehearsal-{secrets.token_hex(12)}"
        keys[lane.name] = made[lane.key_env]
    return keys


def load_lanes(path: Path) -> list[Lane]:
    """The lanes of a lanes file. Raises :class:`LanesInvalid` (its first problem, one line)."""
    label = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LanesInvalid(f"{label}: cannot read the lanes file: {exc.strerror or exc}") from None
    errors: list[ManifestError] = []
    try:
        root = compose(decode(data, label), label)
    except ManifestError as exc:
        raise LanesInvalid(exc.format()) from None
    if root is None:
        raise LanesInvalid(f"{label}:1: lanes: the file is empty; list at least one lane")
    nodes = Nodes(label, errors)
    nodes.prepare(root)
    lanes = _read(nodes, root)
    if errors:
        raise LanesInvalid(errors[0].format())
    return lanes


def _read(nodes: Nodes, root: Node) -> list[Lane]:
    items: Node | None = root
    if not isinstance(root, SequenceNode):
        top = nodes.mapping(root, "lanes")
        if top is None:
            return []
        for key, (line, _) in top.items():
            if key != "lanes":
                nodes.error(line, key, "unknown field; the file holds one list, lanes:")
        if "lanes" not in top:
            nodes.error(root.start_mark.line + 1, "lanes", "missing: list the lanes under lanes:")
            return []
        items = top["lanes"][1]
    if not isinstance(items, SequenceNode) or not items.value:
        line = items.start_mark.line + 1 if items is not None else 1
        nodes.error(line, "lanes", "must be a list of at least one lane")
        return []
    lanes: list[Lane] = []
    seen: dict[str, int] = {}
    for item in items.value:
        lane = _lane(nodes, item)
        if lane is None:
            continue
        line = item.start_mark.line + 1
        if lane.name in seen:
            nodes.error(line, "name", f"lane {lane.name!r} is given twice (first on line "
                        f"{seen[lane.name]})")  # fmt: skip
            continue
        seen[lane.name] = line
        lanes.append(lane)
    return lanes


def _lane(nodes: Nodes, node: Node) -> Lane | None:
    entries = nodes.mapping(node, "lanes")
    if entries is None:
        return None
    at = node.start_mark.line + 1
    ok = True
    for key, (line, _) in entries.items():
        if key.casefold() in _KEY_FIELDS:
            nodes.error(
                line,
                key,
                "a key never goes in the lanes file: put it in an environment variable and "
                "name that variable with key_env",
            )
            return None
        if key not in _FIELDS:
            nodes.error(line, key, f"unknown field (known: {', '.join(_FIELDS)})")
            ok = False
    for required in ("name", "key_env"):
        if required not in entries:
            nodes.error(at, required, "missing")
            ok = False
    if not ok:
        return None
    name = _text(nodes, entries["name"], "name")
    if name is not None and not _NAME.fullmatch(name):
        nodes.error(entries["name"][0], "name", "1 to 40 letters, digits, '.', '_' or '-'")
        return None
    key_env = _key_env(nodes, entries["key_env"])
    region = "intl"
    if "region" in entries:
        region = _text(nodes, entries["region"], "region") or ""
        if region not in _REGIONS:
            nodes.error(entries["region"][0], "region", "must be intl or cn")
            return None
    base_url = None
    if "base_url" in entries:
        base_url = _text(nodes, entries["base_url"], "base_url")
        if base_url is not None:
            base_url = base_url.rstrip("/")
            if not base_url.startswith(("http://", "https://")) or not base_url.endswith("/api/v1"):
                nodes.error(
                    entries["base_url"][0], "base_url", "must be an http(s) URL ending in /api/v1"
                )
                return None
    quota, model_quota = _quota(nodes, entries.get("quota"), at)
    models = _models(nodes, entries["models"]) if "models" in entries else None
    weight = 1.0
    if "weight" in entries:
        weight = _positive(nodes, entries["weight"], "weight") or 0.0
    if nodes.errors or name is None or key_env is None or not weight:
        return None
    if quota is None and not model_quota:
        return None
    if models is not None and model_quota:
        extra = sorted(set(model_quota) - models)
        if extra:
            nodes.error(entries["quota"][0], "quota", f"{extra[0]} is not in the lane's models")
            return None
    return Lane(
        name=name,
        key_env=key_env,
        region=region,
        base_url=base_url,
        quota=quota,
        model_quota=model_quota,
        models=models,
        weight=weight,
    )


def _text(nodes: Nodes, entry: tuple[int, Node], label: str) -> str | None:
    scalar = nodes.scalar(entry[1], label)
    if scalar is None:
        return None
    if not isinstance(scalar.value, str) or scalar.typed or not scalar.value.strip():
        nodes.error(scalar.line, label, "must be text")
        return None
    return scalar.value.strip()


def _key_env(nodes: Nodes, entry: tuple[int, Node]) -> str | None:
    scalar = nodes.scalar(entry[1], "key_env")
    if scalar is None:
        return None
    value = scalar.value
    if isinstance(value, str) and _KEY_LIKE.match(value):
        nodes.error(
            scalar.line,
            "key_env",
            "looks like a key: a key never goes in the lanes file; put it in an environment "
            "variable and give that variable's name here",
        )
        return None
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        nodes.error(
            scalar.line, "key_env", "must be the name of an environment variable (A-Z, 0-9, _)"
        )
        return None
    return value


def _positive(nodes: Nodes, entry: tuple[int, Node], label: str) -> float | None:
    scalar = nodes.scalar(entry[1], label)
    if scalar is None:
        return None
    value = scalar.value
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        nodes.error(scalar.line, label, f"must be a positive number, not {scalar.text[:40]!r}")
        return None
    return float(value)


def _known_model(nodes: Nodes, line: int, label: str, model: object) -> str | None:
    if not isinstance(model, str) or model not in MODELS:
        nodes.error(
            line, label, f"unknown model {str(model)[:40]!r} (known: {', '.join(sorted(MODELS))})"
        )
        return None
    return model


def _quota(
    nodes: Nodes, entry: tuple[int, Node] | None, at: int
) -> tuple[float | None, dict[str, float]]:
    """(quota, per-model quota): a number, or a mapping of model to number."""
    if entry is None:
        nodes.error(at, "quota", "missing: the lane's requests/s (e.g. 2), or one per model")
        return None, {}
    line, node = entry
    if isinstance(node, SequenceNode) or node.tag.endswith(":map"):
        rates = nodes.mapping(node, "quota")
        out: dict[str, float] = {}
        for model, (model_line, value) in (rates or {}).items():
            if _known_model(nodes, model_line, f"quota.{model}", model) is None:
                continue
            rate = _positive(nodes, (model_line, value), f"quota.{model}")
            if rate is not None:
                out[model] = rate
        if rates is not None and not rates:
            nodes.error(line, "quota", "an empty mapping: give a rate per model, or one number")
        return None, out
    return _positive(nodes, entry, "quota"), {}


def _models(nodes: Nodes, entry: tuple[int, Node]) -> frozenset[str] | None:
    line, node = entry
    values = node.value if isinstance(node, SequenceNode) else [node]
    if not values:
        nodes.error(line, "models", "an empty list: leave models out to serve every model")
        return None
    found: set[str] = set()
    for item in values:
        scalar = nodes.scalar(item, "models")
        if scalar is None:
            continue
        model = _known_model(nodes, scalar.line, "models", scalar.value)
        if model is not None:
            found.add(model)
    return frozenset(found)
