"""The emulator's settings and the parsing of its ``--latency`` and ``--faults`` specs.

Everything here is pure. :class:`EmulatorConfig` validates itself when built, so a bad spec fails
at once with one clear :class:`ValueError`, whether it came from the command line, from
``reconfigure`` or from ``POST /_emulator/config``.

Latency spec::

    MS                      fixed, e.g. "0" or "250"
    lognormal:MEDIAN_MS:SIGMA   e.g. "lognormal:2000:0.4" (the default)

Faults spec, a comma list of ``kind=fraction``::

    500        500 InternalError              generation
    503        503 ModelUnavailable           generation
    429        429 Throttling                 generation
    free-quota 429 Throttling.AllocationQuota "Free allocated quota exceeded." (permanent variant)
    <Code>     any documented code of section 4.2 with its status (Arrearage, InternalError.Algo)
    reset      connection dropped after the request is read, before generation: not billed
    lost       image generated and billed, then the connection is dropped
    hang       no answer until the client gives up (or the emulator stops)
    truncate   an image download sends fewer bytes than its Content-Length
    corrupt    an image download sends the right number of bytes, but not a valid PNG
    poll-500   a task poll (GET /tasks/{id}) answers 500 InternalError
    poll-reset a task poll's connection is dropped
    task-failed   a task ends FAILED (InternalError.Algo)
    task-partial  a task of n > 1 images ends SUCCEEDED with its last image failed

The generation kinds apply to synchronous calls and to task creations alike (``lost`` on a
create: the task is created, its answer dropped). Generation, download, poll and task kinds are
four separate draws; the fractions of each group must add up to at most 1.

Task time spec (``task_seconds``): ``S`` fixed, or ``lognormal:MEDIAN_S:SIGMA``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from batcher.emulator.codes import ERROR_CODES, ApiError, api_error

__all__ = [
    "RECONFIGURABLE",
    "EmulatorConfig",
    "FaultKind",
    "FaultPlan",
    "FaultRule",
    "Latency",
    "parse_faults",
    "parse_latency",
    "parse_task_seconds",
]


class FaultKind(StrEnum):
    """The fault kinds with a behaviour of their own (besides plain documented error codes)."""

    HTTP_500 = "500"
    HTTP_503 = "503"
    HTTP_429 = "429"
    FREE_QUOTA = "free-quota"
    RESET = "reset"
    LOST = "lost"
    HANG = "hang"
    TRUNCATE = "truncate"
    CORRUPT = "corrupt"
    POLL_500 = "poll-500"
    POLL_RESET = "poll-reset"
    TASK_FAILED = "task-failed"
    TASK_PARTIAL = "task-partial"


_DOWNLOAD_KINDS = frozenset({FaultKind.TRUNCATE, FaultKind.CORRUPT})
_POLL_KINDS = frozenset({FaultKind.POLL_500, FaultKind.POLL_RESET})
_TASK_KINDS = frozenset({FaultKind.TASK_FAILED, FaultKind.TASK_PARTIAL})
_CONNECTION_KINDS = frozenset({FaultKind.RESET, FaultKind.LOST, FaultKind.HANG})
_OTHER_KINDS = _DOWNLOAD_KINDS | _POLL_KINDS | _TASK_KINDS
_ERROR_KINDS: dict[str, ApiError] = {
    FaultKind.HTTP_500: api_error("InternalError"),
    FaultKind.HTTP_503: api_error("ModelUnavailable"),
    FaultKind.HTTP_429: api_error("Throttling"),
    FaultKind.FREE_QUOTA: api_error("Throttling.AllocationQuota", "Free allocated quota exceeded."),
    FaultKind.POLL_500: api_error("InternalError"),
    FaultKind.TASK_FAILED: api_error("InternalError.Algo", "Inference error."),
    FaultKind.TASK_PARTIAL: api_error("InternalError.Algo", "Inference error."),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Latency:
    """How long a generation takes: ``median_ms * exp(sigma * z)`` for a standard normal ``z``.

    ``sigma == 0`` is a fixed latency.
    """

    median_ms: float
    sigma: float = 0.0

    def seconds(self, z: float) -> float:
        """The latency in seconds for the standard normal draw ``z``."""
        if self.median_ms == 0:
            return 0.0
        return self.median_ms / 1000.0 * math.exp(self.sigma * z)


def parse_latency(spec: str) -> Latency:
    """Parse ``"MS"`` or ``"lognormal:MEDIAN_MS:SIGMA"``.

    >>> parse_latency("lognormal:2000:0.4")
    Latency(median_ms=2000.0, sigma=0.4)
    """
    text = spec.strip()
    parts = text.split(":")
    try:
        if len(parts) == 1:
            latency = Latency(median_ms=float(parts[0]))
        elif len(parts) == 3 and parts[0].strip().lower() == "lognormal":
            latency = Latency(median_ms=float(parts[1]), sigma=float(parts[2]))
        else:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"invalid latency {spec!r}: expected MS (e.g. 0 or 250) "
            "or lognormal:MEDIAN_MS:SIGMA (e.g. lognormal:2000:0.4)"
        ) from None
    if not (math.isfinite(latency.median_ms) and latency.median_ms >= 0):
        raise ValueError(f"invalid latency {spec!r}: milliseconds must be a finite number >= 0")
    if not (math.isfinite(latency.sigma) and 0 <= latency.sigma <= 5):
        raise ValueError(f"invalid latency {spec!r}: sigma must be between 0 and 5")
    return latency


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultRule:
    """One ``kind=fraction`` item; ``error`` is the answer for error kinds, else None."""

    kind: str
    fraction: float
    error: ApiError | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultPlan:
    """The parsed faults spec: generation rules and download rules, each sorted by kind."""

    generation: tuple[FaultRule, ...] = ()
    download: tuple[FaultRule, ...] = ()
    poll: tuple[FaultRule, ...] = ()
    task: tuple[FaultRule, ...] = ()

    def pick_generation(self, u: float) -> FaultRule | None:
        """The generation fault for the uniform draw ``u`` in [0, 1), or None."""
        return _pick(self.generation, u)

    def pick_download(self, u: float) -> FaultRule | None:
        """The download fault for the uniform draw ``u`` in [0, 1), or None."""
        return _pick(self.download, u)

    def pick_poll(self, u: float) -> FaultRule | None:
        """The task-poll fault for the uniform draw ``u`` in [0, 1), or None."""
        return _pick(self.poll, u)

    def pick_task(self, u: float) -> FaultRule | None:
        """The task outcome fault for the uniform draw ``u`` in [0, 1), or None."""
        return _pick(self.task, u)


def _pick(rules: tuple[FaultRule, ...], u: float) -> FaultRule | None:
    edge = 0.0
    for rule in rules:
        edge += rule.fraction
        if u < edge:
            return rule
    return None


def parse_faults(spec: str) -> FaultPlan:
    """Parse a faults spec such as ``"500=0.05,reset=0.01,Arrearage=1"``.

    >>> [r.kind for r in parse_faults("reset=0.1, 500=0.05").generation]
    ['500', 'reset']
    """
    rules: dict[str, FaultRule] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        kind, sep, value = item.rpartition("=")
        kind = kind.strip()
        if not sep or not kind:
            raise ValueError(f"invalid fault {item!r}: expected kind=fraction, e.g. 500=0.05")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"invalid fault {item!r}: {value.strip()!r} is not a number") from None
        if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"invalid fault {item!r}: the fraction must be between 0 and 1")
        if kind in rules:
            raise ValueError(f"invalid faults {spec!r}: {kind!r} is given twice")
        rules[kind] = FaultRule(kind=kind, fraction=fraction, error=_error_for(kind))
    ordered = sorted(rules.items())
    generation = tuple(r for k, r in ordered if k not in _OTHER_KINDS)
    download = tuple(r for k, r in ordered if k in _DOWNLOAD_KINDS)
    poll = tuple(r for k, r in ordered if k in _POLL_KINDS)
    task = tuple(r for k, r in ordered if k in _TASK_KINDS)
    groups = ((generation, "generation"), (download, "download"), (poll, "poll"), (task, "task"))
    for group, name in groups:
        if sum(r.fraction for r in group) > 1.0 + 1e-9:
            raise ValueError(f"invalid faults {spec!r}: the {name} fractions add up to more than 1")
    return FaultPlan(generation=generation, download=download, poll=poll, task=task)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"invalid {name} {value!r}: must be a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"invalid {name} {value!r}: must be a number") from None


def _error_for(kind: str) -> ApiError | None:
    if kind in _ERROR_KINDS:
        return _ERROR_KINDS[kind]
    if kind in _CONNECTION_KINDS or kind in _DOWNLOAD_KINDS or kind == FaultKind.POLL_RESET:
        return None
    if kind in ERROR_CODES:
        return api_error(kind)
    raise ValueError(
        f"unknown fault kind {kind!r}: use one of "
        f"{', '.join(k.value for k in FaultKind)} or a documented error code such as "
        "Arrearage, InternalError.Algo or Throttling.AllocationQuota"
    )


#: The fields that ``reconfigure`` may change while the emulator runs.
RECONFIGURABLE = frozenset(
    {"faults", "rps", "latency", "moderate", "url_ttl", "retry_after", "task_seconds", "task_ttl"}
)


def parse_task_seconds(spec: str) -> Latency:
    """Parse ``"S"`` or ``"lognormal:MEDIAN_S:SIGMA"`` (seconds) as a ``Latency``.

    >>> parse_task_seconds("lognormal:20:0.5")
    Latency(median_ms=20000.0, sigma=0.5)
    """
    parts = spec.strip().split(":")
    try:
        if len(parts) == 1:
            return parse_latency(str(float(parts[0]) * 1000))
        if len(parts) == 3:
            return parse_latency(f"{parts[0]}:{float(parts[1]) * 1000}:{parts[2]}")
    except ValueError:
        pass
    raise ValueError(
        f"invalid task_seconds {spec!r}: expected S (e.g. 3) "
        "or lognormal:MEDIAN_S:SIGMA (e.g. lognormal:20:0.5)"
    )


@dataclass(frozen=True, kw_only=True)
class EmulatorConfig:
    """How the emulator behaves. Validated on construction (``ValueError`` on a bad value).

    Arguments:
        host, port: where to listen; port 0 picks a free port.
        api_key: the one accepted key; None accepts any key that starts with ``sk-``.
        rps: the per-key quota of z-image-turbo, accepted requests per second; every other
            model has its own quota from the model registry (``math.inf``: no quota at all).
            A fractional rate allows ``max(1, floor(rps))`` requests per ``that / rps`` seconds.
        task_seconds: how long an asynchronous task takes, ``S`` or
            ``lognormal:MEDIAN_S:SIGMA``; it is PENDING for its first quarter, then RUNNING.
        task_ttl: seconds a task can be queried; after that it is UNKNOWN.
        latency: ``MS`` or ``lognormal:MEDIAN_MS:SIGMA``.
        faults: ``kind=fraction,...`` (see the module docstring).
        moderate: words whose presence in a prompt (case-insensitive) gives 400
            ``DataInspectionFailed``.
        url_ttl: lifetime in seconds of image URLs (a negative value issues expired URLs).
        seed: makes fault decisions and latency draws reproducible per request number.
        retry_after: a literal Retry-After header value sent with every 429; None sends none.
        max_images: how many issued images stay downloadable (oldest forgotten first).
        accounts: account name -> its keys. Keys of one account share its quota (per model);
            keys of different accounts have quotas of their own, and a task belongs to its
            account. With accounts, a key in none of them (nor ``api_key``) gets 401
            ``InvalidApiKey``. Empty: every key is an account of its own.
        account_rps: account name -> model -> requests/s, the account's quota of the models
            listed in place of the emulator's own (``rps`` for z-image-turbo, else published).

    >>> EmulatorConfig(latency="0", faults="500=0.1").rps
    2.0
    >>> EmulatorConfig(accounts={"a": ("sk-1", "sk-2"), "b": ("sk-3",)}).account_of("sk-2")
    'a'
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = field(default=None, repr=False)
    rps: float = 2.0
    latency: str = "lognormal:2000:0.4"
    faults: str = ""
    moderate: tuple[str, ...] = ()
    url_ttl: float = 86400.0
    seed: int | None = None
    retry_after: str | None = None
    max_images: int = 100_000
    task_seconds: str = "lognormal:20:0.5"
    task_ttl: float = 86400.0
    accounts: Mapping[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    account_rps: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_accounts()
        if not 0 <= self.port <= 65535:
            raise ValueError(f"invalid port {self.port}: must be between 0 and 65535")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ValueError("invalid api_key: must be non-empty without surrounding blanks")
        if math.isnan(self.rps) or self.rps <= 0:
            raise ValueError(f"invalid rps {self.rps}: must be > 0 (inf for no quota)")
        parse_latency(self.latency)
        parse_faults(self.faults)
        if not isinstance(self.moderate, tuple):
            object.__setattr__(self, "moderate", tuple(self.moderate))
        if any(not isinstance(w, str) or not w.strip() for w in self.moderate):
            raise ValueError("invalid moderate: every word must be a non-empty string")
        if not math.isfinite(self.url_ttl):
            raise ValueError(f"invalid url_ttl {self.url_ttl}: must be a finite number of seconds")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"invalid seed {self.seed!r}: must be an integer")
        if self.retry_after is not None and (
            not self.retry_after.strip() or any(c in self.retry_after for c in "\r\n")
        ):
            raise ValueError("invalid retry_after: must be a non-empty single-line header value")
        if self.max_images < 1:
            raise ValueError(f"invalid max_images {self.max_images}: must be >= 1")
        parse_task_seconds(self.task_seconds)
        if not (math.isfinite(self.task_ttl) and self.task_ttl > 0):
            raise ValueError(f"invalid task_ttl {self.task_ttl}: must be a positive number")

    def _check_accounts(self) -> None:
        from batcher.models import MODELS

        accounts = {name: tuple(keys) for name, keys in self.accounts.items()}
        object.__setattr__(self, "accounts", accounts)
        owner: dict[str, str] = {}
        for name, keys in accounts.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError("invalid accounts: an account name must be non-empty text")
            if not keys:
                raise ValueError(f"invalid accounts: account {name!r} has no key")
            for key in keys:
                if not isinstance(key, str) or not key or key != key.strip():
                    raise ValueError(
                        f"invalid accounts: a key of account {name!r} is empty or has blanks"
                    )
                if key in owner and owner[key] != name:  # never echo the key itself
                    raise ValueError(
                        f"invalid accounts: one key is in accounts {owner[key]!r} and {name!r}"
                    )
                owner[key] = name
        for name, rates in self.account_rps.items():
            if name not in accounts:
                raise ValueError(f"invalid account_rps: no account {name!r}")
            for model, rate in rates.items():
                if model not in MODELS:
                    raise ValueError(f"invalid account_rps: unknown model {model!r}")
                if not (isinstance(rate, int | float) and rate > 0 and not math.isnan(rate)):
                    raise ValueError(f"invalid account_rps {name}.{model}: must be > 0")

    def account_of(self, key: str) -> str | None:
        """The account ``key`` belongs to (None: in no account)."""
        for name, keys in self.accounts.items():
            if key in keys:
                return name
        return None

    @property
    def latency_model(self) -> Latency:
        """The parsed ``latency``."""
        return parse_latency(self.latency)

    @property
    def task_time(self) -> Latency:
        """The parsed ``task_seconds`` (as a ``Latency``)."""
        return parse_task_seconds(self.task_seconds)

    @property
    def fault_plan(self) -> FaultPlan:
        """The parsed ``faults``."""
        return parse_faults(self.faults)

    def with_changes(self, **changes: Any) -> EmulatorConfig:
        """A copy with the run-time changeable fields in ``changes`` replaced, validated."""
        unknown = sorted(set(changes) - RECONFIGURABLE)
        if unknown:
            raise ValueError(
                f"cannot change {', '.join(unknown)} while running; "
                f"changeable: {', '.join(sorted(RECONFIGURABLE))}"
            )
        for name in ("rps", "url_ttl", "task_ttl"):
            if name in changes:
                changes[name] = _number(name, changes[name])
        if "moderate" in changes:
            moderate = changes["moderate"]
            changes["moderate"] = (moderate,) if isinstance(moderate, str) else tuple(moderate)
        for name in ("faults", "latency", "task_seconds"):
            if name in changes and not isinstance(changes[name], str):
                raise ValueError(f"invalid {name}: must be a string spec")
        return replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data, with the API key left out."""
        data = asdict(self)
        del data["api_key"]
        data["api_key_set"] = self.api_key is not None
        # the accounts by name and how many keys each has: never the keys
        data["accounts"] = {name: len(keys) for name, keys in self.accounts.items()}
        data["account_rps"] = {name: dict(r) for name, r in self.account_rps.items()}
        data["moderate"] = list(self.moderate)
        data["rps"] = None if math.isinf(self.rps) else self.rps
        return data
