"""The run folder: where the database, the log, the lock and the images live.

::

    DIR/
      batcher.db          the job table (plus -wal/-shm while open), unless the run's
                          table is in PostgreSQL (``--db postgresql://...``)
      batcher.db.tmp      a new batcher.db while its first import runs (no journal, no
                          fsync): linked into place whole at its end; left by a kill, it is
                          made again from nothing by the next plan or run
      batcher.database    a run whose table is in PostgreSQL: its URL, without any
                          password (commands given no --db use it; see RunLayout.locate)
      batcher.log         one line per notable event; never the API key
      .lock               held by the running process (a second run refuses clearly)
      .calls-in-flight    the calls the running process sent (see ``batcher.sendlog``)
      images/             the images, following the manifest's output template
        metadata.jsonl    one line per done image (Hugging Face ``imagefolder`` layout)
        train/metadata.jsonl  ... or one per split folder (see ``batcher.metadata``)
      history/            earlier images of redone jobs, under the same sub-folders
      report/             the static report (``batcher report``): index.html, thumbs/, data/

Paths from a manifest never leave ``images/``: the manifest checker refuses absolute paths
and ``..``, and :meth:`RunLayout.image_path` checks again against symlinks planted in the
folder, creating each missing directory itself rather than letting ``mkdir -p`` follow links.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from jobs.version import DATABASE_URL_SCHEMES

from .errors import ConfigError, PermanentJobError

__all__ = [
    "DATABASE_FILE",
    "RunLayout",
    "RunLock",
    "UnsafeOutputPath",
    "env_database",
    "without_password",
]

DATABASE_FILE = "batcher.database"


def without_password(url: str) -> str:
    """``url`` without the password it may carry (in its user part or as ``?password=``):
    what a run folder may keep on disk. The password comes from ``PGPASSWORD`` or
    ``~/.pgpass`` then, as for ``psql``.

    >>> without_password("postgresql://batcher:s3cret@db:5432/run?password=x&sslmode=require")
    'postgresql://batcher@db:5432/run?sslmode=require'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    user, at, host = netloc.rpartition("@")
    if at:
        netloc = f"{user.partition(':')[0]}@{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k == "password" for k, _ in pairs):
        query = urlencode([(k, v) for k, v in pairs if k != "password"], safe="/")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


class UnsafeOutputPath(PermanentJobError):
    """The output path would leave the run folder's images/ directory."""


def env_database(root: Path, url: str) -> str | None:
    """What ``BATCHER_DATABASE_URL`` (``url``) means for the run folder ``root``: a default
    for new runs and for a run kept in that database, never a redirection of a folder that has
    its own table (``batcher.db``: None, that table) or whose run is in another database
    (refused in one line)."""
    if (root / "batcher.db").exists():
        return None
    marker = root / DATABASE_FILE
    known = _remembered(marker)
    if known is not None and _database_name(known) != _database_name(url):
        raise ConfigError(
            f"BATCHER_DATABASE_URL names database {_database_name(url)!r}, but the run of "
            f"{root} is in {_database_name(known)!r} ({marker}): give --db, or unset "
            "BATCHER_DATABASE_URL"
        )
    return url


def _database_name(url: str) -> str:
    """The database a URL names (its path, or ``?dbname=``), as the server spells it."""
    parts = urlsplit(url)
    for key, value in parse_qsl(parts.query):
        if key in ("dbname", "database"):
            return value
    return unquote(parts.path.lstrip("/"))


def _remembered(marker: Path) -> str | None:
    """The database URL a run folder keeps in ``marker``, if it has one."""
    try:
        text = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read {marker}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if not text.startswith(DATABASE_URL_SCHEMES):
        raise ConfigError(
            f"{marker}, line 1: not a postgresql:// URL; give the run's database with --db"
        )
    return text


@dataclass(frozen=True, slots=True)
class RunLayout:
    """Paths of one run folder, and where its job table is: ``batcher.db`` in the folder, or
    the PostgreSQL database ``database`` names (a URL) when the run's table is shared."""

    root: Path
    database: str | None = None
    # Folders under images/ already made and checked by image_path in this process: a catalog
    # of a million images in a few folders checks each folder once, not once per image.
    _checked: set[Path] = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def locate(cls, root: Path, database: str | None) -> RunLayout:
        """The layout of ``root``, its table in ``database`` when given, else where the folder
        says: a run made with ``--db`` keeps its URL (without password) in
        ``DIR/batcher.database``, so that a command given no ``--db`` (a second host that
        forgot it) works on that table instead of starting an empty ``batcher.db`` beside it
        and paying for every image again."""
        if database is None:
            database = _remembered(root / DATABASE_FILE)
        return cls(root, database)

    def remember_database(self) -> None:
        """For a run whose table is in PostgreSQL, once its database was opened: write the
        URL, without password, to ``DIR/batcher.database`` if the folder has none yet (the
        first one stays: another host may reach the same server by another name), after the
        checks of :meth:`check_database`."""
        if self.check_database():
            return
        marker = self.root / DATABASE_FILE
        temp = self.root / f".{DATABASE_FILE}.{os.getpid()}.part"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            temp.write_text(without_password(self.database or "") + "\n", encoding="utf-8")
            os.replace(temp, marker)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise ConfigError(
                f"cannot write {marker}: {exc.strerror or exc}; choose a writable --out"
            ) from None

    def check_database(self) -> bool:
        """Before a plan or run writes to a PostgreSQL table for this folder: refuse a folder
        that has a table of its own (``batcher.db``), or that remembers another database
        (one folder holds one run's images). Returns whether the folder already remembers
        this one (True also for a run whose table is the folder's own)."""
        if self.database is None:
            return True
        if self.db.exists():
            raise ConfigError(
                f"{self.root} has a job table of its own (batcher.db): a run kept in "
                "PostgreSQL (--db) needs a folder of its own; choose another --out"
            )
        marker = self.root / DATABASE_FILE
        known = _remembered(marker)
        if known is not None:
            if _database_name(known) != _database_name(self.database):
                raise ConfigError(
                    f"{self.root} belongs to the run in database {_database_name(known)!r} "
                    f"({marker}), not {_database_name(self.database)!r}: one folder holds one "
                    "run's images; choose another --out (or delete that file if the database "
                    "was renamed)"
                )
            return True
        return False

    @property
    def db(self) -> Path:
        return self.root / "batcher.db"

    @property
    def store(self) -> str | Path:
        """What :meth:`jobs.JobStore.open` opens: the database URL, else ``batcher.db``."""
        return self.database if self.database is not None else self.db

    @property
    def shared(self) -> bool:
        """Whether several workers may run on this folder's table at once (PostgreSQL)."""
        return self.database is not None

    def has_store(self) -> bool:
        """Whether the run's table may exist: a database URL is given, or ``batcher.db`` is
        in the folder."""
        return self.database is not None or self.db.is_file()

    def no_store(self) -> ConfigError:
        """The error for a folder without ``batcher.db`` (perhaps still in its first import)."""
        from jobs.backends.fresh import temp_path  # (the database's modules: only when needed)

        if temp_path(self.db).exists():
            return ConfigError(
                f"{self.root} has no batcher.db yet: its first import is under way, or was cut "
                "short (plan or run it again)"
            )
        return ConfigError(f"{self.root} is not a batcher run folder (no batcher.db)")

    @property
    def log(self) -> Path:
        return self.root / "batcher.log"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def sent_calls(self) -> Path:
        return self.root / ".calls-in-flight"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def metadata(self) -> Path:
        return self.images / "metadata.jsonl"

    @property
    def history(self) -> Path:
        """Where a redo keeps the images it replaces (never overwritten)."""
        return self.root / "history"

    @property
    def report(self) -> Path:
        """The default folder of the static report."""
        return self.root / "report"

    def history_folder(self, output: str) -> Path:
        """The folder under ``history/`` for earlier images of ``output``, made safely (the same
        checks as :meth:`image_path`: no ``..``, no symlink on the way)."""
        rel = PurePosixPath(output)
        if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
            raise UnsafeOutputPath(f"output path {output!r} leaves the run folder")
        if self.history.is_symlink():
            raise UnsafeOutputPath(f"{self.history} is a symlink; refusing to write through it")
        self._check_folders(self.history, rel, True)
        return self.history.joinpath(*rel.parts[:-1])

    def relative(self, output: str) -> str:
        """The image's path relative to the run folder (what exports show)."""
        return str(PurePosixPath("images") / output)

    def image_path(self, output: str, *, create_parents: bool = True) -> Path:
        """The absolute path for ``output``, with its parent folders made safely.

        Raises :class:`UnsafeOutputPath` if ``output`` is absolute, has ``..``, or runs
        through a symlink (or a non-directory) inside the images folder.
        """
        rel = PurePosixPath(output)
        if rel.is_absolute() or not rel.parts or any(p in ("", ".", "..") for p in rel.parts):
            raise UnsafeOutputPath(f"output path {output!r} leaves the images folder")
        base = self.images
        final = base / Path(*rel.parts)
        if final.parent not in self._checked:
            self._check_folders(base, rel, create_parents)
        try:
            found = os.lstat(final)
        except (FileNotFoundError, NotADirectoryError):
            return final  # nothing there yet (or no folder for it: writing it will say so)
        if not stat.S_ISREG(found.st_mode):
            raise UnsafeOutputPath(f"{final} exists and is not a regular file")
        return final

    def _check_folders(self, base: Path, rel: PurePosixPath, create_parents: bool) -> None:
        """Make (with ``create_parents``) and check every folder from images/ down to the
        image's; remember the ones that passed."""
        if create_parents:
            base.mkdir(parents=True, exist_ok=True)
        current = base
        complete = True
        for part in rel.parts[:-1]:
            current = current / part
            if current.is_symlink():
                raise UnsafeOutputPath(f"{current} is a symlink; refusing to write through it")
            if not current.exists():
                if not create_parents:
                    continue
                try:
                    current.mkdir()
                except FileExistsError:
                    pass
                except OSError:
                    # A read-only or full disk: nothing below exists, so nothing to check.
                    # Writing the image fails the same way and stops the run (DiskProblem).
                    complete = False
                    break
            if not current.is_dir() or current.is_symlink():
                raise UnsafeOutputPath(f"{current} is not a folder")
        if complete and create_parents:
            self._checked.add(current)


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lock``: one ``batcher run`` per folder at a time.

    The kernel drops it when the process dies, even by ``kill -9``, so a crash never leaves
    a stale lock behind.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # O_NOFOLLOW: the lock is truncated and written below; a symlink planted in its
            # place must not carry that to a file outside the run folder.
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ConfigError(
                f"{self._path} is a symlink; remove it (batcher makes its own lock file there)"
            ) from None
        try:
            self._flock(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                other = ""
                with contextlib.suppress(OSError):
                    other = self._path.read_text().strip()
                who = f" (pid {other})" if other.isdigit() else ""
                raise ConfigError(
                    f"another batcher run is using {self._path.parent}{who}; wait for it to "
                    "finish or stop it first"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    @staticmethod
    def _flock(fd: int) -> None:
        """Take the lock, or raise. A lock held for an instant (:meth:`held` looking) is
        waited out for up to ~0.1 s; a run's lock is held far longer and refused."""
        for _ in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.02)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @staticmethod
    def held(path: Path) -> bool:
        """Whether a live process holds the lock at ``path`` now (without taking it: a shared
        lock tried and dropped at once, which :meth:`acquire` waits out)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False  # no lock file (no run ever held it), or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
