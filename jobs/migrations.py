"""Schema migrations: a run folder made by an older batcher opens with this one.

Theory of operation
-------------------
``batcher.db`` carries its schema version in ``meta``. Each numbered step in
:data:`STEPS` takes a database from the version before it to its own number, as plain DDL
(and, where a new column can be filled from old ones, an ``UPDATE``). On open, a database
older than :data:`jobs.schema.SCHEMA_VERSION` is first copied aside whole
(``batcher.db.v1.bak`` for version 1, through SQLite's backup API, so pages still in the WAL
are included), then every missing step and the new version number run in one write
transaction: a crash or a failing step leaves the old version as it was, and the next open
tries again. A database newer than this batcher is refused, never downgraded.

Adding a column: declare it in :mod:`jobs.schema`, raise ``SCHEMA_VERSION``, and add the step
here with the same number. The tables in :mod:`jobs.schema` are always the latest version, and
a test checks that migrating the version-1 fixture gives the same columns as a new database.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .schema import EMULATOR_ENDPOINT

__all__ = ["STEPS", "backup_before_migrating", "backup_path", "steps_after"]

STEPS: dict[int, tuple[str, ...]] = {
    2: (
        # where each image came from; version 1 did not record it. An image whose URL was on
        # the loopback came from an emulator (the built-in one, or `batcher emulate`): a
        # rehearsal, never spent. Other version-1 images stay NULL, "a real endpoint, not
        # recorded" (see the README's "Rehearsals").
        "ALTER TABLE jobs ADD COLUMN endpoint TEXT",
        f"UPDATE jobs SET endpoint = '{EMULATOR_ENDPOINT}' "
        "WHERE endpoint IS NULL AND billed > 0 AND ("
        "image_url LIKE 'http://127.0.0.1:%' OR image_url LIKE 'http://127.0.0.1/%' OR "
        "image_url LIKE 'http://localhost:%' OR image_url LIKE 'http://localhost/%' OR "
        "image_url LIKE 'http://[::1]%')",
        # the manifest row's extra columns, as JSON
        "ALTER TABLE jobs ADD COLUMN vars TEXT",
        # review marks
        "ALTER TABLE jobs ADD COLUMN review TEXT",
        "ALTER TABLE jobs ADD COLUMN review_note TEXT",
        "ALTER TABLE jobs ADD COLUMN reviewed_at FLOAT",
        # why a record went to the history, and where its image was kept
        "ALTER TABLE job_history ADD COLUMN reason TEXT",
        "ALTER TABLE job_history ADD COLUMN file TEXT",
        "UPDATE job_history SET reason = 'replace' WHERE reason IS NULL",
    ),
    3: (
        # the manifest's seed and prompt of a job redone with another one
        "ALTER TABLE jobs ADD COLUMN manifest_seed INTEGER",
        "ALTER TABLE jobs ADD COLUMN manifest_prompt TEXT",
    ),
}


def steps_after(version: int, target: int) -> list[tuple[int, tuple[str, ...]]]:
    """The steps that take ``version`` to ``target``, in order.

    >>> [n for n, _ in steps_after(1, 2)]
    [2]
    """
    return [(n, STEPS[n]) for n in range(version + 1, target + 1)]


def backup_path(db: Path, version: int) -> Path:
    """Where the copy of a version-``version`` database is kept before it is migrated."""
    return db.with_name(f"{db.name}.v{version}.bak")


def backup_before_migrating(db: Path, version: int) -> Path:
    """Copy ``db`` aside, consistently, before its first migration; return the copy's path.

    An existing copy is kept (the first one is the one made by the old release). The copy is
    written under a temporary name, fsynced and renamed, so a crash never leaves a partial
    backup under the final name.
    """
    dest = backup_path(db, version)
    if dest.exists():
        return dest
    temp = dest.with_name(f".{dest.name}.part")
    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out = sqlite3.connect(temp)
        try:
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, dest)
    return dest
