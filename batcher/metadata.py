"""``metadata.jsonl``: the images folder as a Hugging Face ``imagefolder`` dataset.

Layout
------
An image whose output path starts with a split folder (``train/``, ``test/``,
``validation/`` and the other names ``datasets`` takes for a split: :data:`SPLIT_FOLDERS`)
is listed in that folder's own ``metadata.jsonl``, its ``file_name`` relative to it
(``images/train/metadata.jsonl``: ``{"file_name": "photo/ds-0001.png", ...}``): that is
where ``load_dataset("imagefolder", data_dir=...)`` looks for each split's metadata. Every
other image is listed in ``images/metadata.jsonl``. A job of several images (``n > 1``) has
a line for each of its files (``cat-1.png``, ``cat-2.png``, ...; ``image_index`` 1, 2, ...).
Each line carries the built-in fields of
:data:`batcher.records.METADATA_FIELDS` and then every manifest variable
(:func:`batcher.records.metadata_row`).

Kept current during a run
-------------------------
The files are appended to as the images are committed, one write per batch of images, so a
long run's dataset can be loaded while it runs. ``meta`` records whether the files are known
to list exactly the done jobs' images: ``metadata_files`` is ``clean:N`` after a run ended
cleanly with N lines in all. A run that starts on anything else (a crash, ``--replace``, a variable
edited in the manifest, a batcher that wrote no per-split files) rewrites every file from the
job table first, each under a temporary name then renamed; a clean start only appends. So
after ``kill -9`` the files still parse (each batch is one ``write`` of whole lines) and the
next run completes them.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from jobs import State

from .layout import RunLayout
from .records import (
    METADATA_FIELDS,
    SPLIT_FOLDERS,
    image_records,
    metadata_row,
    split_of,
    variable_keys,
)

if TYPE_CHECKING:
    from jobs import JobStore

__all__ = ["SPLIT_FOLDERS", "MetadataWriter", "split_of"]

STATE_KEY = "metadata_files"  # meta: "clean:N" when the files list exactly the N done jobs
NAME = "metadata.jsonl"


class MetadataWriter:
    """Writes a run folder's ``metadata.jsonl`` files; see the module docstring.

    ``start`` brings them up to date and opens them for appending; ``add`` appends the
    lines of newly done jobs; ``finish`` records how many lines they hold.
    """

    def __init__(self, store: JobStore, layout: RunLayout) -> None:
        self._store = store
        self._layout = layout
        self._keys: list[tuple[str, str]] = []
        self._text: frozenset[str] = frozenset()  # variables that hold text somewhere
        self._lines = 0
        self._lock = anyio.Lock()
        self._broken = False  # a write failed: the files are rewritten next time

    def path_for(self, split: str | None) -> Path:
        """Where the metadata of ``split`` (None: images outside split folders) lives."""
        return self._layout.images / split / NAME if split else self._layout.images / NAME

    async def start(self, *, rewrite: bool = False) -> int:
        """Rewrite the files unless they are known to list every done job; returns the lines.

        After this, until :meth:`finish`, the files are marked as not to be trusted, so a
        crash in between makes the next start rewrite them.
        """
        await self._load_variables()
        state = await self._store.get_meta(STATE_KEY)
        done = await self._store.done_images()
        await self._store.set_meta(STATE_KEY, "")
        if not rewrite and state == f"clean:{done}" and await self._keys_unchanged():
            self._lines = done
        else:
            self._lines = await self.rewrite()
        return self._lines

    async def _load_variables(self) -> None:
        found = await self._store.variables()
        self._keys = variable_keys(list(found), METADATA_FIELDS)
        self._text = frozenset(name for name, kinds in found.items() if "text" in kinds)

    async def _keys_unchanged(self) -> bool:
        known = await self._store.get_meta(f"{STATE_KEY}:keys")
        return known == json.dumps([self._keys, sorted(self._text)])

    async def refresh(self) -> int:
        """Rewrite the files now and mark them clean (after an import changed the done jobs,
        their paths or their variables); returns the lines."""
        await self._load_variables()
        await self._store.set_meta(STATE_KEY, "")
        self._lines = await self.rewrite()
        await self._store.set_meta(STATE_KEY, f"clean:{self._lines}")
        return self._lines

    async def rewrite(self) -> int:
        """Write every file again from the job table, atomically each; returns the lines."""
        self._layout.images.mkdir(parents=True, exist_ok=True)
        temps: dict[str | None, tuple[Path, Any]] = {}
        n = 0
        try:
            async for job in self._store.iter_records(state=State.DONE):
                for rec in image_records(job):
                    split = split_of(rec["output"])
                    if split not in temps:
                        target = self.path_for(split)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        # A name of this process's own: workers sharing one run folder may
                        # each rewrite the files (at start and at the end) at the same time.
                        temp = target.with_name(
                            f".{NAME}.{os.getpid()}.{secrets.token_hex(4)}.part"
                        )
                        temps[split] = (temp, temp.open("w", encoding="utf-8"))
                    temps[split][1].write(self._line(rec, split))
                    n += 1
            for _temp, fh in temps.values():
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            for split, (temp, _fh) in temps.items():
                os.replace(temp, self.path_for(split))
        except BaseException:
            for temp, fh in temps.values():
                fh.close()
                temp.unlink(missing_ok=True)
            raise
        # A split (or the root) with no done image left keeps no stale file.
        for split in (None, *sorted(SPLIT_FOLDERS)):
            if split not in temps:
                self.path_for(split).unlink(missing_ok=True)
        await self._store.set_meta(
            f"{STATE_KEY}:keys", json.dumps([self._keys, sorted(self._text)])
        )
        self._broken = False
        return n

    def _line(self, rec: dict[str, Any], split: str | None) -> str:
        output = rec["output"]
        file_name = output[len(split) + 1 :] if split else output
        row = metadata_row(rec, file_name, self._keys, self._text)
        return json.dumps(row, ensure_ascii=False) + "\n"

    async def add(self, ids: Sequence[str]) -> None:
        """Append the lines of ``ids`` (jobs just done). A disk error is logged by the caller
        through the raised OSError; the files are then rewritten by the next run."""
        if not ids:
            return
        records = await self._store.done_records(list(ids))
        by_file: dict[str | None, list[str]] = {}
        for job in records:
            if job["state"] != State.DONE.value:
                continue
            for rec in image_records(job):
                split = split_of(rec["output"])
                by_file.setdefault(split, []).append(self._line(rec, split))
        async with self._lock:
            try:
                await anyio.to_thread.run_sync(self._append, by_file)
            except OSError:
                self._broken = True
                raise
            self._lines += sum(len(lines) for lines in by_file.values())

    def _append(self, by_file: dict[str | None, list[str]]) -> None:
        for split, lines in by_file.items():
            path = self.path_for(split)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = "".join(lines).encode()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:  # one write of whole lines: a reader never sees half a batch
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)

    def _sync(self) -> None:
        for split in (None, *SPLIT_FOLDERS):
            try:
                fd = os.open(self.path_for(split), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def finish(self) -> int:
        """Mark the files clean if they list exactly the done jobs' images (rewriting them if
        not); returns the lines they hold."""
        done = await self._store.done_images()
        if self._broken or self._lines != done:
            self._lines = await self.rewrite()
        else:
            await anyio.to_thread.run_sync(self._sync)
        await self._store.set_meta(STATE_KEY, f"clean:{self._lines}")
        return self._lines
