"""The job store's database backends: what SQLite and PostgreSQL do differently.

:mod:`jobs.store` holds everything both share; :func:`open_backend` picks one for a target,
a SQLite file path or a ``postgresql://`` URL.
"""

from __future__ import annotations

from pathlib import Path

from .base import CLAIM_COLUMNS, Backend, Op
from .postgres import PostgresBackend, is_database_url
from .sqlite import SQLiteBackend

__all__ = [
    "CLAIM_COLUMNS",
    "Backend",
    "Op",
    "PostgresBackend",
    "SQLiteBackend",
    "is_database_url",
    "open_backend",
]


def open_backend(target: str | Path, *, read_only: bool = False, stage: bool = False) -> Backend:
    """The backend of ``target``: PostgreSQL for a ``postgresql://`` URL, else a SQLite file
    (``read_only``: opened immutable; ``stage``: a file that does not exist yet is made under a
    temporary name, see :mod:`jobs.backends.fresh`)."""
    if isinstance(target, str) and is_database_url(target):
        return PostgresBackend(target)
    return SQLiteBackend(Path(target), read_only=read_only, stage=stage)
