"""A new SQLite job database is made under a temporary name and linked into place whole.

When ``batcher.db`` does not exist yet, its store is made as ``batcher.db.tmp`` beside it with
no journal file and no fsync (``journal_mode=MEMORY``: a rollback still works;
``synchronous=OFF``): the first import's rows, ~250 MB for a million jobs, are written once,
where the WAL writes them twice (the log, then the checkpoint, which reads them back) and
fsyncs at each commit. Once the first import has committed (or the store closes without one),
the file is switched to WAL, fsynced, hard-linked to ``batcher.db`` (a link never replaces a
file that appeared meanwhile), the folder is fsynced and the temporary name removed; the store
then opens ``batcher.db`` as it always does (WAL, ``synchronous=FULL``).

Crash-safety. Until the link, ``batcher.db`` does not exist: a process killed (or a disk
filling up) at any moment before it leaves at most the temporary file, which is never opened as
the database; the next command that creates the store starts it again from nothing, and one
that finds ``batcher.db`` removes the leftover name. From the link on, ``batcher.db`` is whole:
it was fsynced before it got its name. An empty ``batcher.db`` found at the end (a reader that
looked meanwhile: ``sqlite3.connect`` makes the file it is given) is replaced; any other file
there is left alone and the command fails in one line.

One process makes the file at a time: the maker holds an exclusive ``flock`` on the temporary
file, which the kernel releases when the process dies. Another process that wants to create the
same store waits for it (up to SQLite's busy timeout, as it waited for the import's write lock
before), then opens the database the first one published, or makes it if the first died. The
lock is taken on the file whose name is still ``batcher.db.tmp`` (the inode is compared after
locking), so a file already published and unlinked is never taken for a fresh one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import stat
import time
from pathlib import Path

from ..durable import fsync_dir
from ..errors import StoreUnavailable

__all__ = ["PRAGMAS", "FreshFile", "remove_leftover", "temp_path"]

# The temporary file's connections: no journal file, no fsync (the file is fsynced once, whole,
# before it is published; a crash before that loses a file nobody opens).
PRAGMAS = (
    "PRAGMA journal_mode=MEMORY",
    "PRAGMA synchronous=OFF",
    "PRAGMA busy_timeout=15000",
    "PRAGMA foreign_keys=ON",
)
WAIT = 15.0  # seconds to wait for another process making the same file (SQLite's busy_timeout)
_POLL = 0.05
_SIDES = ("-journal", "-wal", "-shm")
LOCKED = "the job database is locked by another process; is another batcher running here?"


def temp_path(db: Path) -> Path:
    """Where ``db`` is made before it is published."""
    return db.with_name(db.name + ".tmp")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def _flock(fd: int, deadline: float) -> None:
    """An exclusive flock on ``fd``, waited for until ``deadline`` (monotonic)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StoreUnavailable(LOCKED) from None
            time.sleep(_POLL)


def _empty_file(path: Path) -> bool:
    """Whether ``path`` is a regular file of no bytes (no database has been written in it)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return True
    return stat.S_ISREG(found.st_mode) and found.st_size == 0


def remove_leftover(db: Path) -> None:
    """Remove the temporary name of ``db`` left by a process killed after publishing it (the
    name may be a second link to ``batcher.db``'s file: only the name goes), unless a live
    process holds it. Call only when ``db`` exists."""
    temp = temp_path(db)
    if not os.path.lexists(temp):
        return
    with contextlib.suppress(OSError):
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: in use
            if _same_file(fd, temp) and db.exists():
                temp.unlink()
        finally:
            os.close(fd)


class FreshFile:
    """The temporary file of a database being made, locked by this process
    (see the module docstring). :meth:`claim` it, open SQLite on :attr:`temp` with
    :data:`PRAGMAS`, then, every connection to it closed, :meth:`publish` or :meth:`discard`."""

    def __init__(self, db: Path, fd: int) -> None:
        self.db = db
        self.temp = temp_path(db)
        self._fd: int | None = fd

    @classmethod
    def claim(cls, db: Path, *, wait: float = WAIT) -> FreshFile | None:
        """Lock ``db``'s temporary file, emptied, for this process to make ``db`` in; None when
        ``db`` exists (perhaps made by the process this one waited for). Raises
        :class:`StoreUnavailable` when another process holds it longer than ``wait`` seconds."""
        temp = temp_path(db)
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise StoreUnavailable(f"cannot create {temp}: {exc.strerror or exc}") from exc
            try:
                _flock(fd, deadline)
                if not _same_file(fd, temp):  # published (or removed) by the holder waited for
                    os.close(fd)
                    continue
                if os.path.lexists(db):  # a leftover name, or the holder's published file
                    temp.unlink()
                    os.close(fd)
                    return None
                # A file left by a process that died making it: start again from nothing.
                os.ftruncate(fd, 0)
                for side in _SIDES:
                    Path(f"{temp}{side}").unlink(missing_ok=True)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            return cls(db, fd)

    def publish(self) -> None:
        """Make the file ``db``: WAL mode (as every connection to ``db`` sets anyway, but
        recorded in the file before anyone opens it), fsynced, linked to its name, the folder
        fsynced, the temporary name removed. On an error the file is discarded (``db`` is then
        not there) and :class:`StoreUnavailable` raised."""
        try:
            con = sqlite3.connect(self.temp, isolation_level=None)
            try:
                mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            finally:
                con.close()
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"{self.temp} could not be switched to WAL ({mode})")
            assert self._fd is not None
            os.fsync(self._fd)
            for side in ("-wal", "-shm"):  # a deleted database's, never this file's
                Path(f"{self.db}{side}").unlink(missing_ok=True)
            try:
                os.link(self.temp, self.db)
            except FileExistsError:
                if not _empty_file(self.db):
                    raise StoreUnavailable(
                        f"{self.db} appeared while this process was making it (a batcher that "
                        "does not wait for the other?): run the command again"
                    ) from None
                # An empty file: what a reader that looked meanwhile leaves (sqlite3.connect
                # makes the file it is given); nothing in it to keep.
                os.rename(self.temp, self.db)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # A file system without hard links: renamed, no other maker can be between
                # the look and the rename (they wait for this file's lock).
                if os.path.lexists(self.db) and not _empty_file(self.db):
                    raise StoreUnavailable(
                        f"{self.db} appeared while this process was making it: run the "
                        "command again"
                    ) from None
                os.rename(self.temp, self.db)
            fsync_dir(self.db.parent)
        except sqlite3.Error as exc:
            self.discard()
            raise StoreUnavailable(f"{self.temp} could not be published: {exc}") from exc
        except OSError as exc:
            self.discard()
            raise StoreUnavailable(
                f"{self.db} could not be written: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            self.discard()
            raise
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()
        self._release()

    def discard(self) -> None:
        """Remove the temporary file (and its side files) unpublished; ``db`` stays absent."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.temp):  # (only a name, if it was linked to db too)
                self.temp.unlink()
        for side in _SIDES:
            with contextlib.suppress(OSError):
                Path(f"{self.temp}{side}").unlink()
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with it
            self._fd = None
