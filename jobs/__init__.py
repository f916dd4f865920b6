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

if TYPE_CHECKING:
    from .manifest import Manifest, open_manifest

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


def __getattr__(name: str) -> Any:
    """The manifest readers (YAML, CSV, JSONL), imported on first use: commands that only read
    the job table (``batcher export``, ``status``) start without them."""
    if name in ("Manifest", "open_manifest"):
        from . import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
