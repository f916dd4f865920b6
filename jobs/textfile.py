"""Text manifests read line by line, with every encoding problem located.

``open_text`` gives the file as text lines (line ends kept, for ``csv.reader``) through a
``TextIOWrapper`` over a ``CheckedReader``. The checked reader sees each raw chunk before it
is decoded: it refuses a UTF-16 BOM and NUL bytes (UTF-16 without a BOM, binary files) with
the line they are on, and remembers where the chunk starts so a ``UnicodeDecodeError`` from
the wrapper can be turned into a located error too. This keeps the C text layer's speed: a
Python check per 64 KiB chunk, none per line.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobs.errors import ManifestError

__all__ = ["CheckedReader", "open_text"]

_BLOCK = 1 << 20
_CHUNK = 1 << 16  # the text layer's read size; its default of 8 KiB costs more calls


class CheckedReader(io.BufferedReader):
    """A buffered binary reader that refuses NUL bytes and UTF-16, and knows its line."""

    path: str = ""
    line = 1  # the line at which the chunk last returned starts
    _next = 1
    _first = True

    def read1(self, size: int = -1, /) -> bytes:
        data = super().read1(size)
        if self._first and data:
            self._first = False
            if data.startswith((b"\xff\xfe", b"\xfe\xff")):
                raise ManifestError(self.path, 1, "encoding", "UTF-16 text; save the file as UTF-8")
        self.line = self._next
        nul = data.find(b"\x00")
        if nul >= 0:
            raise ManifestError(
                self.path,
                self.line + data.count(b"\n", 0, nul),
                "encoding",
                "NUL byte: not a UTF-8 text file (UTF-16? binary?); save it as UTF-8",
            )
        self._next += data.count(b"\n")
        return data

    def decode_error(self, exc: UnicodeDecodeError) -> ManifestError:
        """The located error for a decoding failure in the chunk last returned."""
        line = self.line + exc.object.count(b"\n", 0, exc.start)
        byte = exc.object[exc.start]
        return ManifestError(
            self.path, line, "encoding", f"not UTF-8 (byte 0x{byte:02x}); save the file as UTF-8"
        )


@contextmanager
def open_text(path: Path, shown: str) -> Iterator[tuple[io.TextIOWrapper, CheckedReader]]:
    """The file as UTF-8 text lines (BOM dropped, line ends kept) and its checking reader."""
    with path.open("rb", buffering=0) as raw:
        checked = CheckedReader(raw, _BLOCK)
        checked.path = shown
        with io.TextIOWrapper(checked, encoding="utf-8-sig", newline="") as text:
            text._CHUNK_SIZE = _CHUNK  # type: ignore[attr-defined]
            yield text, checked
