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
)
from .manifest import Manifest, open_manifest
from .spec import DEFAULT_MODEL, JobSpec
from .states import TERMINAL, TRANSITIONS, State, check_transition
from .store import (
    EMULATOR_ENDPOINT,
    Claim,
    Generated,
    ImportReport,
    JobStore,
    Moved,
    Spend,
    Stats,
    StoredFile,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMULATOR_ENDPOINT",
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
    "Moved",
    "SchemaMismatch",
    "Spend",
    "State",
    "Stats",
    "StoreUnavailable",
    "StoredFile",
    "check_transition",
    "open_manifest",
]
