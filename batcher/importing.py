"""Bringing a run folder's job table in line with its manifest (``plan`` and ``run`` share it).

The manifest is the source of truth (see :mod:`jobs.merge`): rows that left it are withdrawn,
rows that came back are restored, a row whose only change is its ``output`` moves its job. A
done job's image is moved here, on disk, after the import committed: first every image to a
name of its own under ``DIR/.moving/`` then each to its new path, so jobs may swap paths; a
crash in between is finished by the next import (the moves stay recorded until done). When
the set of done images changed, ``metadata.jsonl`` is rewritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from jobs import JobStore, Moved, State, Stats, open_manifest
from jobs.naming import image_output
from jobs.spec import KindCounts

from . import __version__
from .folder import MANIFEST_KEY, Target, check_manifest
from .layout import RunLayout, UnsafeOutputPath
from .metadata import MetadataWriter
from .modelrules import RULES
from .wording import plural

__all__ = ["ImportSummary", "apply_moves", "import_manifest", "path_text"]

log = logging.getLogger("batcher")

MAX_WARNINGS_SHOWN = 5


@dataclass(frozen=True, kw_only=True, slots=True)
class ImportSummary:
    """What importing a manifest did to the table."""

    added: int
    unchanged: int
    replaced: int
    withdrawn: int = 0
    restored: int = 0
    moved: int = 0
    updated: int = 0  # rows whose manifest variables alone changed (their images stand)
    read: bool = True  # False: the manifest was unchanged, not read again
    # A first import into an empty table: its jobs per (model, prompt_extend), all pending,
    # none billed, as the store counted them loading (None: count over the table)
    fresh: KindCounts | None = None

    def unchanged_of(self, stats: Stats) -> int:
        """Jobs already imported and still in the manifest. A manifest not read again
        leaves them to be counted from the table's ``stats`` (a count that is there anyway)."""
        if self.read:
            return self.unchanged
        return stats.total - stats.count(State.WITHDRAWN) - self.added

    @property
    def done_set_changed(self) -> bool:
        """Whether the done jobs, or their paths, may differ from before the import."""
        return bool(self.replaced or self.withdrawn or self.restored or self.moved)


def path_text(path: Path | str) -> str:
    """A path as text the database can hold: a file name that is not UTF-8 (bytes the
    filesystem allows) keeps its odd bytes as ``\\xff`` escapes instead of failing to encode."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _manifest_identity(path: Path) -> tuple[str, str]:
    """(meta key, digest): which manifest, and what decides its rows (its bytes and this
    batcher's version)."""
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    where = path_text(os.path.abspath(path))
    return f"manifest:{where}", f"{__version__}:{digest.hexdigest()}"


def _warn(msg: str) -> None:
    print(f"batcher: {msg}", file=sys.stderr)


async def import_manifest(store: JobStore, target: Target, *, replace: bool) -> ImportSummary:
    """Import the manifest of ``target`` as the whole truth of its folder.

    A manifest unchanged since its last import (and still the folder's) is not read again: with
    a million rows that would be most of the time a resumed run takes to its first call. The
    manifest's warnings (at most five, then a count) go to stderr. Raises ``ConfigError`` when
    a default folder belongs to another manifest. Afterwards ``metadata.jsonl``, if there is
    one, lists exactly the done jobs (a run may append to it).
    """
    manifest_path, layout = target.manifest, target.layout
    new_manifest = await check_manifest(store, target)
    key = digest = None
    with contextlib.suppress(OSError):  # open_manifest reports the problem, located
        key, digest = await anyio.to_thread.run_sync(_manifest_identity, manifest_path)
    if (
        key is not None
        and not replace
        and new_manifest is None
        and await store.get_meta(key) == digest
    ):
        total = await store.count()  # withdrawn ones included: see unchanged_of
        log.info("%s unchanged since its last import: not read again", manifest_path)
        moved = await apply_moves(store, layout)  # left by an import a crash cut short
        if moved:
            await MetadataWriter(store, layout).refresh()
        return ImportSummary(added=0, unchanged=total, replaced=0, moved=moved, read=False)
    manifest = open_manifest(manifest_path, rules=RULES)
    report = await store.import_rows(
        manifest.rows(), source=path_text(manifest_path), replace=replace, withdraw=True
    )
    if key is not None and digest is not None:
        await store.set_meta(key, digest)
    if new_manifest is not None:
        previous = await store.get_meta(MANIFEST_KEY)
        await store.set_meta(MANIFEST_KEY, new_manifest)
        if previous is not None:
            _warn(
                f"warning: {layout.root} followed {previous}; it follows {manifest_path} "
                f"from now on ({report.withdrawn} jobs of the other manifest withdrawn)"
            )
    shown = manifest.warnings[:MAX_WARNINGS_SHOWN]
    for w in shown:
        _warn(f"warning: {w.format()}")
    if len(manifest.warnings) > len(shown):
        more = plural(len(manifest.warnings) - len(shown), "more warning")
        _warn(f"warning: ... and {more}")
    summary = ImportSummary(
        added=report.added,
        unchanged=report.unchanged,
        replaced=report.replaced,
        withdrawn=report.withdrawn,
        restored=report.restored,
        moved=report.moved,
        updated=report.updated,
        fresh=report.fresh,
    )
    await apply_moves(store, layout)
    if summary.done_set_changed or summary.updated:
        await MetadataWriter(store, layout).refresh()
    log.info(
        "import of %s: %d new, %d unchanged, %d replaced, %d withdrawn, %d back, %d moved",
        manifest_path,
        summary.added,
        summary.unchanged,
        summary.replaced,
        summary.withdrawn,
        summary.restored,
        summary.moved,
    )
    return summary


async def apply_moves(store: JobStore, layout: RunLayout) -> int:
    """Move the images of done jobs whose output path changed; returns the jobs moved. Each
    file of a job of several images moves with it (``cat-2.png`` to ``new-2.png``)."""
    moves = await store.pending_moves()
    if not moves:
        return 0
    by_job: dict[tuple[str, int], list[Moved]] = {}  # (job, image of several or 0): moves
    for m in moves:
        if m.n > 1:
            for k in m.indexes:
                each = replace(m, old=image_output(m.old, k, m.n), new=image_output(m.new, k, m.n))
                by_job.setdefault((m.job_id, k), []).append(each)
        else:
            by_job.setdefault((m.job_id, 0), []).append(m)
    await anyio.to_thread.run_sync(_move_files, layout, by_job)
    await store.finish_moves([m.seq for m in moves])
    return len({m.job_id for m in moves})


def _prune_empty_folders(layout: RunLayout, old: str) -> None:
    """Remove the folders under images/ an image was moved out of, while they are empty."""
    folder = (layout.images / old).parent
    while folder != layout.images and layout.images in folder.parents:
        try:
            folder.rmdir()  # only an empty folder; a symlink or a file is never removed
        except OSError:
            return
        folder = folder.parent


def _move_files(layout: RunLayout, by_job: dict[tuple[str, int], list[Moved]]) -> None:
    aside = layout.root / ".moving"
    temps: dict[tuple[str, int], Path] = {}
    for key, chain in by_job.items():
        image = key[1]  # one file of a job of several images, or 0
        temp = aside / (f"{chain[0].seq}-{image}.png" if image else f"{chain[0].seq}.png")
        temps[key] = temp
        if temp.exists():
            continue  # set aside by an earlier attempt
        for m in reversed(chain):  # the latest old path that still holds the image
            try:
                source = layout.image_path(m.old)
            except UnsafeOutputPath:
                continue
            if source.is_file():
                aside.mkdir(exist_ok=True)
                os.replace(source, temp)
                break
    for key, chain in by_job.items():
        job_id = key[0]
        temp = temps[key]
        if not temp.exists():
            log.warning("job %s: its image was not found to move to %s", job_id, chain[-1].new)
            continue
        try:
            dest = layout.image_path(chain[-1].new)
        except UnsafeOutputPath as exc:
            log.warning("job %s: image left in %s: %s", job_id, temp, exc)
            continue
        os.replace(temp, dest)
        log.info("job %s: image moved to %s", job_id, chain[-1].new)
        for m in chain:
            _prune_empty_folders(layout, m.old)
    with contextlib.suppress(OSError):
        aside.rmdir()  # only when empty
