"""Dataset shards on disk: Parquet files and WebDataset tars, written whole or not at all.

Each shard is written under a temporary name (``.train-00003.parquet.part``), fsynced, and
renamed to its final name only when the export has written every shard (a Parquet shard's
final name carries the count: ``train-00003-of-00007.parquet``). A killed export leaves
temporary files only; the next export into the folder removes them, and also the shards of an
earlier export that this one did not write again, so the folder holds one export.

The bytes depend only on the rows: no clock time, user or host goes into a file (tar members
have mtime 0, uid and gid 0, no user names; Parquet carries no timestamps), so an export
run again over the same run folder writes the same bytes.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ParquetShards", "ShardSet", "TarShards"]

_PART = re.compile(r"^\.[^/]+\.part$")


@dataclass(slots=True)
class ShardSet:
    """The shards of one kind (``ext``) in ``folder``, named per split."""

    folder: Path
    ext: str
    with_count: bool  # final names carry "-of-NNNNN" (Parquet, as Hugging Face names them)
    written: dict[str, list[Path]] = field(default_factory=dict)  # split -> temporary paths

    def final_pattern(self) -> re.Pattern[str]:
        tail = r"-of-\d{5}" if self.with_count else ""
        digits = 5 if self.with_count else 6
        return re.compile(rf"^[^/.]+-\d{{{digits}}}{tail}\.{re.escape(self.ext)}$")

    def clean_temporaries(self) -> None:
        """Remove what a killed export left (temporary shards only)."""
        for entry in self.folder.iterdir():
            if _PART.match(entry.name) and entry.name.endswith(f".{self.ext}.part"):
                entry.unlink(missing_ok=True)

    def new(self, split: str) -> Path:
        """The temporary path of ``split``'s next shard."""
        paths = self.written.setdefault(split, [])
        temp = self.folder / f".{split}-{len(paths):05d}.{self.ext}.part"
        paths.append(temp)
        return temp

    def final_name(self, split: str, index: int, count: int) -> str:
        if self.with_count:
            return f"{split}-{index:05d}-of-{count:05d}.{self.ext}"
        return f"{split}-{index:06d}.{self.ext}"

    def publish(self) -> list[Path]:
        """Fsync every shard, rename them to their final names, remove older shards; returns
        the final paths, in name order."""
        finals: list[Path] = []
        for split in sorted(self.written):
            temps = self.written[split]
            for i, temp in enumerate(temps):
                _fsync(temp)
                final = self.folder / self.final_name(split, i, len(temps))
                os.replace(temp, final)
                finals.append(final)
        keep = {p.name for p in finals}
        pattern = self.final_pattern()
        for entry in self.folder.iterdir():
            if pattern.match(entry.name) and entry.name not in keep:
                entry.unlink(missing_ok=True)
        _fsync(self.folder)
        return finals

    def discard(self) -> None:
        for temps in self.written.values():
            for temp in temps:
                temp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TarShards:
    """WebDataset shards: one tar per ``shard_size`` bytes of members, per split.

    A sample is a group of members with one key (``KEY.png``, ``KEY.json``, ``KEY.txt``);
    a sample never straddles two shards.
    """

    def __init__(self, shards: ShardSet, shard_size: int) -> None:
        self._shards = shards
        self._limit = shard_size
        self._open: dict[str, tuple[Any, tarfile.TarFile, int]] = {}  # split -> (file, tar, n)

    def add(self, split: str, key: str, members: Mapping[str, bytes]) -> None:
        """Write one sample (extension -> bytes) to ``split``'s current shard."""
        size = sum(512 + len(data) + (-len(data)) % 512 for data in members.values())
        current = self._open.get(split)
        if current is not None and current[2] and current[2] + size > self._limit:
            self._close(split)
            current = None
        if current is None:
            fh = open(self._shards.new(split), "wb")  # noqa: SIM115 (closed by _close)
            tar = tarfile.open(  # noqa: SIM115 (closed by _close)
                fileobj=fh, mode="w", format=tarfile.PAX_FORMAT
            )
            current = (fh, tar, 0)
        fh, tar, written = current
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        self._open[split] = (fh, tar, written + size)

    def _close(self, split: str) -> None:
        fh, tar, _ = self._open.pop(split)
        tar.close()
        fh.close()

    def close(self) -> None:
        for split in list(self._open):
            self._close(split)


class ParquetShards:
    """Parquet shards: row groups of at most ``group_bytes`` (or ``group_rows``), shards of
    about ``shard_size`` bytes, per split, all with one schema."""

    def __init__(
        self,
        shards: ShardSet,
        shard_size: int,
        schema: Any,
        *,
        group_rows: int = 1000,
        group_bytes: int = 32 << 20,
    ) -> None:
        import pyarrow.parquet as pq

        self._pq = pq
        self._shards = shards
        self._limit = shard_size
        self._schema = schema
        self._group_rows = group_rows
        self._group_bytes = min(group_bytes, shard_size)
        # split -> [writer or None, rows pending, bytes pending, bytes in shard]
        self._state: dict[str, list[Any]] = {}

    def add(self, split: str, row: dict[str, Any], size: int) -> None:
        """Queue one row (``size``: about its bytes) for ``split``."""
        state = self._state.setdefault(split, [None, [], 0, 0])
        if (state[3] or state[2]) and state[3] + state[2] + size > self._limit:
            self._flush(split)  # the shard is full: its last group, then a new shard
            if state[0] is not None:
                state[0].close()
            state[0], state[3] = None, 0
        elif state[1] and state[2] + size > self._group_bytes:
            self._flush(split)
        state[1].append(row)
        state[2] += size
        if len(state[1]) >= self._group_rows:
            self._flush(split)

    def _flush(self, split: str) -> None:
        import pyarrow as pa

        state = self._state[split]
        if not state[1]:
            return
        if state[0] is None:
            state[0] = self._pq.ParquetWriter(
                self._shards.new(split),
                self._schema,
                compression="zstd",
                write_statistics=False,
            )
        table = pa.Table.from_pylist(state[1], schema=self._schema)
        state[0].write_table(table, row_group_size=len(state[1]))
        state[3] += state[2]
        state[1], state[2] = [], 0

    def close(self) -> None:
        for split, state in self._state.items():
            self._flush(split)
            if state[0] is not None:
                state[0].close()
                state[0] = None
