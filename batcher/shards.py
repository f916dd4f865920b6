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

import contextlib
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ParquetShards", "ShardSet", "TarShards", "tar_header"]

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

    def prepare(self) -> None:
        """Make the folder if need be and remove what a killed export left in it (temporary
        shards only)."""
        self.folder.mkdir(exist_ok=True)
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


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar files end on a whole record, as tar(1) and tarfile write them
# A ustar header with everything but the name, the size and the checksum filled in: mode
# 0644, uid and gid 0, mtime 0, a regular file, no user or group name.
_USTAR = bytearray(_BLOCK)
_USTAR[100:108] = b"0000644\x00"
_USTAR[108:116] = b"0000000\x00"
_USTAR[116:124] = b"0000000\x00"
_USTAR[136:148] = b"00000000000\x00"
_USTAR[156:157] = b"0"
_USTAR[257:265] = b"ustar\x0000"
_USTAR_SUM = sum(_USTAR) + 8 * 32  # the checksum field counts as eight spaces
# The fixed parts around the name, size and checksum, joined with them per member (one
# ``join`` costs about half of filling a copy of the whole template).
_OWNER = bytes(_USTAR[100:124])  # mode, uid, gid
_MTIME = bytes(_USTAR[136:148])
_REST = bytes(_USTAR[156:])  # type flag, link name, magic, version, empty names
_ZEROS = bytes(_BLOCK)
# The bytes of each extension as the name field holds it (".txt" padded with one NUL to the
# width of ".json", whose NULs add nothing to the checksum).
_PNG_SUM, _JSON_SUM, _TXT_SUM = sum(b".png"), sum(b".json"), sum(b".txt")
_DIRECT = 64 * 1024  # members this large skip the per-sample join
_WRITEBACK = 32 << 20  # bytes of a shard written between two writeback hints


def tar_header(name: str, size: int) -> bytes:
    """The header of a regular member ``name`` of ``size`` bytes, as ``tarfile`` would write
    it with mode 0644 and mtime 0 (a pax header first for a long or non-ASCII name)."""
    raw = name.encode()
    if len(raw) > 100 or not name.isascii() or size >= 8**11:
        import tarfile  # here only: ten modules an export of ASCII keys need not start with

        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    size_field = b"%011o\x00" % size
    checksum = _USTAR_SUM + sum(raw) + sum(size_field)
    parts = (raw, _ZEROS[: 100 - len(raw)], _OWNER, size_field, _MTIME, b"%06o\x00 " % checksum)
    return b"".join((*parts, _REST))


@functools.cache
def _sync_file_range() -> Any:
    """Linux's ``sync_file_range`` from the C library, or None elsewhere."""
    import ctypes

    try:
        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


def start_writeback(fd: int, start: int, end: int) -> None:
    """Ask the kernel to start writing bytes ``start`` to ``end`` of ``fd`` to disk, without
    waiting (``SYNC_FILE_RANGE_WRITE``): the shard's one fsync at the end then finds most of it
    written instead of waiting for all of it. A hint only: nothing happens where unsupported."""
    func = _sync_file_range()
    if func is not None and end > start:
        func(fd, start, end - start, 2)


class TarShards:
    """WebDataset shards: one tar per ``shard_size`` bytes of members, per split.

    A sample is a group of members with one key (``KEY.png``, ``KEY.json``, ``KEY.txt``);
    a sample never straddles two shards. The members are written with their headers made by
    :func:`tar_header` straight into a buffered file: ``tarfile``'s own member objects cost
    more than the rest of an export of small images.
    """

    def __init__(self, shards: ShardSet, shard_size: int) -> None:
        self._shards = shards
        self.shard_size = shard_size
        self._open: dict[str, tuple[Any, int]] = {}  # split -> (file, bytes written)
        self._hinted: dict[str, int] = {}  # split -> bytes of its shard handed to writeback

    def add(self, split: str, key: str, members: Mapping[str, bytes]) -> None:
        """Write one sample (extension -> bytes) to ``split``'s current shard."""
        size = sum(_BLOCK + len(data) + (-len(data)) % _BLOCK for data in members.values())
        fh, written = self._shard_for(split, size)
        parts: list[bytes] = []
        for ext, data in members.items():
            header = tar_header(f"{key}.{ext}", len(data))
            pad = (-len(data)) % _BLOCK
            if len(data) >= _DIRECT:  # large: written as it is, not copied into a join
                if parts:
                    fh.write(b"".join(parts))
                    parts = []
                fh.write(header)
                fh.write(data)
                if pad:
                    fh.write(_ZEROS[:pad])
            else:
                parts += (header, data, _ZEROS[:pad])
            written += len(header) + len(data) + pad
        if parts:
            fh.write(b"".join(parts))  # one write per sample of small members
        if written - self._hinted.get(split, 0) >= _WRITEBACK:
            fh.flush()
            start_writeback(fh.fileno(), self._hinted.get(split, 0), written)
            self._hinted[split] = written
        self._open[split] = (fh, written)

    def add_sample(
        self, split: str, key: str, png: bytes | None, record: bytes, text: bytes
    ) -> None:
        """Write one sample of the WebDataset export (``KEY.png`` unless ``png`` is None,
        ``KEY.json``, ``KEY.txt``): the same bytes :meth:`add` writes for these members, with
        the three headers built from the key's bytes once (an ASCII key of up to 95 bytes, as
        :func:`batcher.shardexport.sample_key` makes most; any other goes through :meth:`add`)."""
        raw = key.encode()
        if len(raw) > 95 or not key.isascii() or (png is not None and len(png) >= 8**11):
            members = {"png": png} if png is not None else {}
            self.add(split, key, {**members, "json": record, "txt": text})
            return
        pad_j, pad_t = -len(record) % _BLOCK, -len(text) % _BLOCK
        size = 2 * _BLOCK + len(record) + pad_j + len(text) + pad_t
        pad_p = 0
        if png is not None:
            pad_p = -len(png) % _BLOCK
            size += _BLOCK + len(png) + pad_p
        fh, written = self._shard_for(split, size)
        base = _USTAR_SUM + sum(raw)
        fill = _ZEROS[: 95 - len(raw)]  # the name field after KEY and a 5-byte extension
        j_size = b"%011o\x00" % len(record)
        t_size = b"%011o\x00" % len(text)
        head_j = (raw, b".json", fill, _OWNER, j_size, _MTIME)
        head_t = (raw, b".txt\x00", fill, _OWNER, t_size, _MTIME)
        j_sum = b"%06o\x00 " % (base + _JSON_SUM + sum(j_size))
        t_sum = b"%06o\x00 " % (base + _TXT_SUM + sum(t_size))
        tail = (
            *head_j, j_sum, _REST, record, _ZEROS[:pad_j],
            *head_t, t_sum, _REST, text, _ZEROS[:pad_t],
        )  # fmt: skip
        if png is None:
            fh.write(b"".join(tail))
        else:
            p_size = b"%011o\x00" % len(png)
            p_sum = b"%06o\x00 " % (base + _PNG_SUM + sum(p_size))
            head = (raw, b".png\x00", fill, _OWNER, p_size, _MTIME, p_sum, _REST)
            if len(png) >= _DIRECT:  # large: written as it is, not copied into a join
                fh.write(b"".join(head))
                fh.write(png)
                fh.write(b"".join((_ZEROS[:pad_p], *tail)))
            else:
                fh.write(b"".join((*head, png, _ZEROS[:pad_p], *tail)))
        written += size
        if written - self._hinted.get(split, 0) >= _WRITEBACK:
            fh.flush()
            start_writeback(fh.fileno(), self._hinted.get(split, 0), written)
            self._hinted[split] = written
        self._open[split] = (fh, written)

    def current(self, split: str) -> int:
        """The bytes of members in ``split``'s open shard (0 with none open)."""
        got = self._open.get(split)
        return got[1] if got is not None else 0

    def add_chunk(self, split: str, chunk: bytes | memoryview, roll: bool) -> None:
        """Write whole samples, their members already joined (headers, data, padding), as
        :mod:`batcher._speedups` makes them: the bytes :meth:`add_sample` writes for each.
        That module decides where a shard ends by :meth:`_shard_for`'s rule; ``roll``:
        close ``split``'s open shard first (its samples go to a new one)."""
        if roll and split in self._open:
            self._close(split)
        fh, written = self._open.get(split) or self._new(split)
        # Straight to the file, after what add_sample wrote before (flushed first): the
        # buffered file's copy of each chunk measured a tenth of an export of small images.
        fh.flush()
        view, fd = memoryview(chunk), fh.fileno()
        while view:
            view = view[os.write(fd, view) :]
        written += len(chunk)
        if written - self._hinted.get(split, 0) >= _WRITEBACK:
            start_writeback(fh.fileno(), self._hinted.get(split, 0), written)
            self._hinted[split] = written
        self._open[split] = (fh, written)

    def _shard_for(self, split: str, size: int) -> tuple[Any, int]:
        """``split``'s shard to write ``size`` more bytes to, and what it holds: a new one
        when the current one would pass the shard size (a shard holds one sample at least)."""
        current = self._open.get(split)
        if current is not None and current[1] and current[1] + size > self.shard_size:
            self._close(split)
            current = None
        return current or self._new(split)

    def _new(self, split: str) -> tuple[Any, int]:
        """A new shard of ``split``, open, and what it holds (nothing)."""
        return open(self._shards.new(split), "wb", buffering=4 << 20), 0

    def _close(self, split: str) -> None:
        fh, written = self._open.pop(split)
        self._hinted.pop(split, None)
        end = written + 2 * _BLOCK  # two zero blocks end the archive
        try:
            fh.write(bytes(2 * _BLOCK + (-end) % _RECORD))
        finally:
            fh.close()  # (after a failed write too: its file is removed, and its space freed)

    def close(self) -> None:
        for split in list(self._open):
            self._close(split)

    def abandon(self) -> None:
        """Close every open shard as it is, for an export that failed (its shards are then
        removed): nothing more is written, and a flush that fails (a full disk) is no second
        error. Closing flushes first, and the file is closed even when the flush fails."""
        for fh, _ in self._open.values():
            with contextlib.suppress(OSError):
                fh.close()
        self._open.clear()
        self._hinted.clear()


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

    def abandon(self) -> None:
        """Close every open shard without its pending rows, for an export that failed (its
        shards are then removed); an error closing one (a full disk) is no second error."""
        for state in self._state.values():
            if state[0] is not None:
                with contextlib.suppress(Exception):  # pyarrow's OSError, or its own
                    state[0].close()
                state[0] = None
            state[1], state[2] = [], 0
