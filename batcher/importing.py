"""Bringing a run folder's job table in line with its manifest (``plan`` and ``run`` share it)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio

from jobs import JobStore, open_manifest

from . import __version__

__all__ = ["ImportSummary", "import_manifest"]

log = logging.getLogger("batcher")

MAX_WARNINGS_SHOWN = 5


@dataclass(frozen=True, kw_only=True, slots=True)
class ImportSummary:
    """What importing a manifest did to the table."""

    added: int
    unchanged: int
    replaced: int
    updated: int  # rows whose manifest variables alone changed (their images stand)


def _manifest_identity(path: Path) -> tuple[str, str]:
    """(meta key, digest): which manifest, and what decides its rows (its bytes and this
    batcher's version)."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return f"manifest:{os.path.abspath(path)}", f"{__version__}:{digest.hexdigest()}"


def _warn(msg: str) -> None:
    print(f"batcher: {msg}", file=sys.stderr)


async def import_manifest(store: JobStore, manifest_path: Path, *, replace: bool) -> ImportSummary:
    """Import new rows. A manifest unchanged since its last import is not read again: with a
    million rows that would be most of the time a resumed run takes to its first call.

    The manifest's warnings (at most five, then a count) go to stderr.
    """
    key = digest = None
    with contextlib.suppress(OSError):  # open_manifest reports the problem, located
        key, digest = await anyio.to_thread.run_sync(_manifest_identity, manifest_path)
    if key is not None and not replace and await store.get_meta(key) == digest:
        total = await store.count()
        log.info("%s unchanged since its last import: not read again", manifest_path)
        return ImportSummary(added=0, unchanged=total, replaced=0, updated=0)
    manifest = open_manifest(manifest_path)
    report = await store.import_rows(manifest.rows(), source=str(manifest_path), replace=replace)
    if key is not None and digest is not None:
        await store.set_meta(key, digest)
    shown = manifest.warnings[:MAX_WARNINGS_SHOWN]
    for w in shown:
        _warn(f"warning: {w.format()}")
    if len(manifest.warnings) > len(shown):
        _warn(f"warning: ... and {len(manifest.warnings) - len(shown)} more warnings")
    return ImportSummary(
        added=report.added,
        unchanged=report.unchanged,
        replaced=report.replaced,
        updated=report.updated,
    )
