"""The job table's schema version and the ``meta`` keys read outside :mod:`jobs.store`.

Kept apart from :mod:`jobs.schema` (SQLAlchemy's table objects) so that a reader of the
SQLite file through the standard library's ``sqlite3`` (``batcher export``'s WebDataset path)
can check the version the way :meth:`jobs.JobStore.open` does without importing SQLAlchemy.
"""

from __future__ import annotations

__all__ = ["MICROS", "SCHEMA_VERSION", "VARIABLES_KEY", "VERSION_KEY"]

from decimal import Decimal

SCHEMA_VERSION = 7
VERSION_KEY = "schema_version"  # meta: the schema version, as text
VARIABLES_KEY = "variables"  # meta: the manifest variables and their JSON types, as JSON
MICROS = Decimal(1_000_000)  # jobs.cost_micros is in millionths of the currency
