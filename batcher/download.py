"""Download one generated image: streamed, verified, hashed, fsynced, renamed into place.

The file appears at its final path only complete and checked: every byte passes the PNG
checker and sha256 as it streams in (held in memory up to ``SPILL``, beyond that in a hidden
temporary file in the same folder), the size is compared with Content-Length and the
dimensions with the API's ``usage``; then, in a worker thread (creating files is slow on some
file systems and must not stall the event loop), the temporary file is written, fsynced,
renamed into place, and the folder fsynced (:func:`commit_all` does a batch of images in one
trip to the thread and one fsync per folder). Any failure removes the temporary file. A disk
that fills up, or a folder that turns read-only, stops the run (:class:`DiskProblem`)
instead of failing job after job.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anyio

from jobs.durable import fsync_dir

from .classify import TransportFault
from .client import translate_exception
from .errors import DownloadError, RunAborted
from .png import PngError, PngVerifier

__all__ = ["MAX_IMAGE_BYTES", "DiskProblem", "Downloaded", "download_image", "hash_file"]

# A 2048*2048 RGBA PNG stored uncompressed is about 16.8 MB: nothing valid is larger.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
CHUNK = 256 * 1024
SPILL = 4 * 1024 * 1024  # images up to this size are held in memory until committed
NAME_MAX = 255  # bytes in one file name on every common file system
_DISK_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,  # a file size limit (RLIMIT_FSIZE, or the file system's)
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
}


class DiskProblem(RunAborted):
    """The images could not be written to disk."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Downloaded:
    """A verified image, held in ``data`` (small ones) or at ``temp``, to be put at ``dest``."""

    temp: Path
    dest: Path
    data: bytes | None
    sha256: str
    bytes: int
    width: int
    height: int


def _disk_problem(exc: OSError, where: Path) -> DiskProblem:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return DiskProblem(
        f"cannot write images to {where.parent}: {reason}",
        advice="free disk space or fix the folder's permissions, then run the same command again",
    )


async def download_image(
    session: aiohttp.ClientSession,
    url: str,
    dest: Path,
    *,
    expect_width: int | None,
    expect_height: int | None,
    timeout: float = 120.0,  # noqa: ASYNC109 (aiohttp's per-request timeout)
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Downloaded:
    """Fetch ``url`` into a temporary file beside ``dest`` and verify it.

    Call :func:`commit` with the result to put it in place. Raises DownloadError (retry the
    download, or regenerate when the URL is dead) or DiskProblem (stop the run).
    """
    temp = _temp_path(dest)
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                body = await resp.content.read(4096)
                expired = resp.status == 403 and b"expired" in body.lower()
                raise DownloadError(
                    "expired" if expired else f"http_{resp.status}", status=resp.status
                )
            declared = resp.content_length
            if declared is not None and declared > max_bytes:
                raise DownloadError(
                    "too_large", detail=f"{declared} bytes declared, limit {max_bytes}"
                )
            verifier = PngVerifier()
            digest = hashlib.sha256()
            size = 0
            buffer = bytearray()
            fd: int | None = None
            try:
                async for block in resp.content.iter_chunked(CHUNK):
                    size += len(block)
                    if size > max_bytes:
                        raise DownloadError("too_large", detail=f"more than {max_bytes} bytes")
                    verifier.feed(block)
                    digest.update(block)
                    if fd is None:
                        buffer += block
                        if len(buffer) <= SPILL:
                            continue
                        # A large image: spill to the temporary file instead of holding it.
                        fd = await anyio.to_thread.run_sync(_create, temp, dest)
                        block, buffer = bytes(buffer), bytearray()
                    try:
                        _write_all(fd, block)
                    except OSError as exc:
                        raise _disk_problem(exc, dest) from exc
            finally:
                if fd is not None:
                    os.close(fd)
            if declared is not None and size != declared:
                raise DownloadError("truncated", detail=f"{size} of {declared} bytes")
            width, height = verifier.finish()
    except PngError as exc:
        _unlink(temp)
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise DownloadError(reason, detail=str(exc)) from exc
    except (TimeoutError, aiohttp.ClientError) as exc:
        _unlink(temp)
        # mapped as every call and poll is (one place: the client's translate_exception); a
        # body cut short is "truncated", anything else the connection's fault
        lost = translate_exception(exc)
        reason = "truncated" if lost.fault is TransportFault.BAD_RESPONSE else "connection"
        raise DownloadError(reason, detail=lost.detail) from exc
    except BaseException:
        _unlink(temp)
        raise
    if (expect_width, expect_height) != (None, None) and (width, height) != (
        expect_width,
        expect_height,
    ):
        _unlink(temp)
        raise DownloadError(
            "size_mismatch",
            detail=f"image is {width}*{height}, the API said {expect_width}*{expect_height}",
        )
    return Downloaded(
        temp=temp,
        dest=dest,
        data=None if fd is not None else bytes(buffer),
        sha256=digest.hexdigest(),
        bytes=size,
        width=width,
        height=height,
    )


def _temp_path(dest: Path) -> Path:
    """A hidden, unique ``.NAME.XXXXXXXX.part`` beside ``dest``, within the 255-byte name limit
    (a manifest may give ``dest`` a name of 255 bytes already)."""
    suffix = f".{secrets.token_hex(4)}.part"
    name = dest.name.encode("utf-8")
    room = NAME_MAX - 1 - len(suffix)
    stem = name[:room].decode("utf-8", "ignore") if len(name) > room else dest.name
    return dest.with_name(f".{stem}{suffix}")


def _create(temp: Path, dest: Path) -> int:
    try:
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError as exc:
        # The folder is missing: the layout could not make it (a read-only or full disk).
        # Making it here surfaces the real cause for the message, or lets the write go on.
        try:
            os.makedirs(temp.parent, exist_ok=True)
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as why:
            raise _disk_problem(why, dest) from exc
    except OSError as exc:
        raise _disk_problem(exc, dest) from exc


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte: a write to a file may be short (the disk filling up, a size limit),
    and the bytes it leaves out would otherwise be missing from a file already verified."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _place(item: Downloaded) -> None:
    """Write (or fsync) the temporary file and rename it over ``dest``; the folder is not
    synced here (see :func:`_commit_sync`)."""
    try:
        if item.data is not None:  # small image held in memory: write it now
            fd = _create(item.temp, item.dest)
            try:
                _write_all(fd, item.data)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            fd = os.open(item.temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(item.temp, item.dest)
    except OSError as exc:
        _unlink(item.temp)
        if exc.errno in _DISK_ERRNOS:
            raise _disk_problem(exc, item.dest) from exc
        raise
    except BaseException:
        _unlink(item.temp)
        raise


def _commit_sync(items: Sequence[Downloaded]) -> list[BaseException | None]:
    """Put every item in place, then fsync each folder once: one folder fsync makes all the
    renames into it durable, so a batch of images pays for one, not one each."""
    outcomes: list[BaseException | None] = []
    for item in items:
        try:
            _place(item)
            outcomes.append(None)
        except Exception as exc:  # this image's problem: the others go on
            outcomes.append(exc)
    folders: dict[Path, list[int]] = {}
    for i, (item, outcome) in enumerate(zip(items, outcomes, strict=True)):
        if outcome is None:
            folders.setdefault(item.dest.parent, []).append(i)
    for folder, members in folders.items():
        try:
            fsync_dir(folder)
        except OSError as exc:
            # Renamed but not known durable: not complete. The hash recorded beforehand lets
            # the next run finish these without downloading again.
            err: BaseException = (
                _disk_problem(exc, items[members[0]].dest) if exc.errno in _DISK_ERRNOS else exc
            )
            for i in members:
                outcomes[i] = err
    return outcomes


async def commit(item: Downloaded) -> None:
    """fsync the temporary file, rename it into place, fsync the folder (in a worker thread)."""
    (outcome,) = await commit_all([item])
    if outcome is not None:
        raise outcome


async def commit_all(items: Sequence[Downloaded]) -> list[BaseException | None]:
    """:func:`commit` for several images in one trip to a worker thread; each one's error
    (a :class:`DiskProblem`, or another OSError) or None, in order."""
    return await anyio.to_thread.run_sync(_commit_sync, items)


def discard(item: Downloaded) -> None:
    """Drop a verified download that will not be committed."""
    _unlink(item.temp)


def hash_file(path: Path) -> tuple[str, int] | None:
    """sha256 and size of an existing file, or None when it is missing or unreadable."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as fh:
            while block := fh.read(CHUNK):
                digest.update(block)
                size += len(block)
    except OSError:
        return None
    return digest.hexdigest(), size


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # best effort; the sweep at start removes leftovers


def sweep_partials(root: Path, *, older_than: float | None = None) -> int:
    """Remove temporary ``.*.part`` files left by a crash. Returns how many.

    ``older_than`` (seconds): only files not written for that long, for a folder that live
    workers share: their own temporary files are being written, or renamed within seconds."""
    n = 0
    if not root.is_dir():
        return 0
    cutoff = None if older_than is None else time.time() - older_than
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            if name.startswith(".") and name.endswith(".part"):
                path = Path(dirpath) / name
                if cutoff is not None:
                    try:
                        if path.stat().st_mtime >= cutoff:
                            continue
                    except OSError:
                        continue  # renamed or removed by its worker meanwhile
                _unlink(path)
                n += 1
    return n
