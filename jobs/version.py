"""The job table's schema version, and what else a reader of a SQLite run folder needs to
read it as :class:`jobs.JobStore` does.

Kept apart from :mod:`jobs.schema` (SQLAlchemy's table objects) so that a reader of the
SQLite file through the standard library's ``sqlite3`` (``batcher export``'s WebDataset path)
can check the version the way :meth:`jobs.JobStore.open` does, and list the manifest
variables, without importing SQLAlchemy.
"""

from __future__ import annotations

__all__ = [
    "DATABASE_URL_SCHEMES",
    "EMULATOR_ENDPOINT",
    "MICROS",
    "SCHEMA_VERSION",
    "SQLITE_VARIABLES_SQL",
    "VARIABLES_KEY",
    "VERSION_KEY",
]

from decimal import Decimal

SCHEMA_VERSION = 8
DATABASE_URL_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")
"""How a URL naming a PostgreSQL run table starts (anything else names a SQLite file)."""
VERSION_KEY = "schema_version"  # meta: the schema version, as text
VARIABLES_KEY = "variables"  # meta: the manifest variables and their JSON types, as JSON
EMULATOR_ENDPOINT = "emulator"
"""``jobs.endpoint`` of an image made by an emulator (``--emulate``): a rehearsal, whose cost
was never spent. A real image's endpoint is the API base URL it came from."""
MICROS = Decimal(1_000_000)  # jobs.cost_micros is in millionths of the currency
# The manifest variables of a SQLite table, in the order they first appear (by manifest row,
# then by position in the row), each with its JSON types (json_each's names, comma-separated)
SQLITE_VARIABLES_SQL = (
    "SELECT v.key, group_concat(DISTINCT v.type) "
    "FROM jobs, json_each(jobs.vars) AS v WHERE jobs.vars IS NOT NULL "
    "GROUP BY v.key ORDER BY MIN(jobs.rowid * 65536 + v.id)"
)
