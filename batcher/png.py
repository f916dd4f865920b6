"""A streaming PNG checker: signature, chunk CRCs, IHDR size and IEND, without decoding pixels.

It sees every byte once as it streams to disk, so a truncated or corrupted image is refused
before it is renamed into place, at a cost of one CRC32 pass.

>>> v = PngVerifier()
>>> v.feed(png_bytes)  # doctest: +SKIP
>>> v.finish()  # (width, height)  # doctest: +SKIP
"""

from __future__ import annotations

import struct
import zlib

__all__ = ["PNG_SIGNATURE", "PngError", "PngVerifier"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_CHUNK = 1 << 31


class PngError(ValueError):
    """The bytes are not a valid PNG."""


class PngVerifier:
    """Feed the bytes of a file in any chunking; ``finish`` returns ``(width, height)``."""

    __slots__ = ("_buf", "_crc", "_ctype", "_ended", "_left", "_sig_ok", "height", "width")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._sig_ok = False
        self._left = -1  # bytes of chunk data still to come; -1 means "between chunks"
        self._ctype = b""
        self._crc = 0
        self._ended = False
        self.width: int | None = None
        self.height: int | None = None

    def feed(self, data: bytes) -> None:
        if self._ended:
            if data:
                raise PngError("data after the IEND chunk")
            return
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        if not self._sig_ok:
            if n < 8:
                if PNG_SIGNATURE[:n] != bytes(buf):
                    raise PngError("not a PNG file (bad signature)")
                return
            if bytes(buf[:8]) != PNG_SIGNATURE:
                raise PngError("not a PNG file (bad signature)")
            self._sig_ok = True
            pos = 8
        while True:
            if self._left < 0:  # a chunk header: length + type
                if n - pos < 8:
                    break
                length, ctype = struct.unpack_from(">I4s", buf, pos)
                if length >= _MAX_CHUNK or not ctype.isalpha():
                    raise PngError("damaged chunk header")
                if self.width is None and ctype != b"IHDR":
                    raise PngError("the first chunk is not IHDR")
                self._ctype = ctype
                self._crc = zlib.crc32(ctype)
                self._left = length
                pos += 8
                if ctype == b"IHDR" and length != 13:
                    raise PngError("bad IHDR length")
            if self._left > 0:  # chunk data, possibly large: CRC it as it streams by
                take = min(self._left, n - pos)
                if take <= 0:
                    break
                if self._ctype == b"IHDR":
                    if n - pos < 13:
                        break
                    self.width, self.height = struct.unpack_from(">II", buf, pos)
                self._crc = zlib.crc32(memoryview(buf)[pos : pos + take], self._crc)
                pos += take
                self._left -= take
                if self._left > 0:
                    break
            if n - pos < 4:  # the CRC
                self._left = 0
                break
            (crc,) = struct.unpack_from(">I", buf, pos)
            pos += 4
            if crc != self._crc:
                raise PngError(f"CRC mismatch in the {self._ctype.decode('ascii')} chunk")
            self._left = -1
            if self._ctype == b"IEND":
                self._ended = True
                if pos != n:
                    raise PngError("data after the IEND chunk")
                break
        del buf[:pos]

    def finish(self) -> tuple[int, int]:
        """Check that the file ended cleanly; return its ``(width, height)``."""
        if not self._ended or self.width is None or self.height is None:
            raise PngError("the PNG is truncated (no IEND chunk)")
        return self.width, self.height
