"""The durable job table: manifests in, a SQLite state machine of jobs out.

Knows nothing about HTTP or images. ``batcher`` builds on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    IllegalTransition,
    JobStoreError,
    LeaseLost,
    ManifestError,
    ManifestInvalid,
    SchemaMismatch,
    StoreUnavailable,
    StoreUnreachable,
    UnknownJob,
)
from .params import ModelRules
from .spec import JobSpec
from .states import TERMINAL, TRANSITIONS, State, check_transition

if TYPE_CHECKING:
    from .manifest import Manifest, open_manifest
    from .store import (
        EMULATOR_ENDPOINT,
        REVIEW_MARKS,
        Claim,
        Generated,
        ImportReport,
        JobImage,
        JobStore,
        LaneCalls,
        Moved,
        Redo,
        Spend,
        Stats,
        StoredFile,
    )

__all__ = [
    "EMULATOR_ENDPOINT",
    "REVIEW_MARKS",
    "TERMINAL",
    "TRANSITIONS",
    "Claim",
    "Generated",
    "IllegalTransition",
    "ImportReport",
    "JobImage",
    "JobSpec",
    "JobStore",
    "JobStoreError",
    "LaneCalls",
    "LeaseLost",
    "Manifest",
    "ManifestError",
    "ManifestInvalid",
    "ModelRules",
    "Moved",
    "Redo",
    "SchemaMismatch",
    "Spend",
    "State",
    "Stats",
    "StoreUnavailable",
    "StoreUnreachable",
    "StoredFile",
    "UnknownJob",
    "check_transition",
    "open_manifest",
]


_STORE = frozenset(
    {"EMULATOR_ENDPOINT", "REVIEW_MARKS", "Claim", "Generated", "ImportReport", "JobImage"}
    | {"JobStore", "LaneCalls", "Moved", "Redo", "Spend", "Stats", "StoredFile"}
)


def __getattr__(name: str) -> Any:
    """The job store (SQLAlchemy) and the manifest readers (YAML, CSV, JSONL), imported on
    first use: ``batcher export`` of a SQLite run folder reads the table with the standard
    library's sqlite3 alone (:mod:`batcher.leanexport`), and SQLAlchemy's import is most of
    its start-up; commands that only read the job table start without the readers."""
    if name in _STORE:
        from . import store

        value = getattr(store, name)
    elif name in ("Manifest", "open_manifest"):
        from . import manifest

        value = getattr(manifest, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
