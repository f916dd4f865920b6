"""The curated public surface of each package (STYLE convention 1)."""

from __future__ import annotations

import batcher
import batcher.emulator
import jobs
import jobs.backends


def test_batcher_exports():
    assert sorted(batcher.__all__) == sorted(
        [
            "REGIONS",
            "ApiError",
            "BatcherError",
            "ConfigError",
            "DashScopeClient",
            "DownloadError",
            "ImageResult",
            "Money",
            "PermanentJobError",
            "RunAborted",
            "RunLayout",
            "RunOptions",
            "RunResult",
            "Runner",
            "StopReason",
            "TransientError",
            "TransportError",
            "__version__",
            "price_per_image",
        ]
    )


def test_jobs_exports():
    assert sorted(jobs.__all__) == sorted(
        [
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
    )


def test_jobs_backends_exports():
    assert sorted(jobs.backends.__all__) == sorted(
        [
            "CLAIM_COLUMNS",
            "Backend",
            "Op",
            "PostgresBackend",
            "SQLiteBackend",
            "is_database_url",
            "open_backend",
        ]
    )


def test_every_exported_name_exists_and_is_documented():
    for module in (batcher, jobs, batcher.emulator, jobs.backends):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj) and not name.isupper():
                assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


def test_the_jobs_package_knows_nothing_of_batcher():
    import pathlib

    root = pathlib.Path(jobs.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "import batcher" not in text and "from batcher" not in text, path


def test_pure_modules_do_no_io():
    import pathlib

    root = pathlib.Path(batcher.__file__).parent
    for name in ("classify.py", "backoff.py", "pacing.py", "png.py", "pricing.py", "reach.py"):
        text = (root / name).read_text(encoding="utf-8")
        for banned in ("import aiohttp", "import sqlite3", "import sqlalchemy", "open("):
            assert banned not in text, f"{name} uses {banned}"
