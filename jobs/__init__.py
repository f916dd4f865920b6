"""The durable job table: manifests in, a SQLite state machine of jobs out.

Knows nothing about HTTP or images. ``batcher`` builds on it.
"""

from __future__ import annotations

from .errors import (
    IllegalTransition,
    JobStoreError,
    LeaseLost,
    ManifestError,
    ManifestInvalid,
    SchemaMismatch,
    StoreUnavailable,
    UnknownJob,
)
from .manifest import Manifest, open_manifest
from .params import ModelRules
from .spec import JobSpec
from .states import TERMINAL, TRANSITIONS, State, check_transition
from .store import (
    EMULATOR_ENDPOINT,
    REVIEW_MARKS,
    Claim,
    Generated,
    ImportReport,
    JobStore,
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
    "JobSpec",
    "JobStore",
    "JobStoreError",
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
    "StoredFile",
    "UnknownJob",
    "check_transition",
    "open_manifest",
]
