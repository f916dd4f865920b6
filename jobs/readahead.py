"""A big manifest read and checked in a helper process, so that an import uses two cores.

Reading and checking a million CSV rows costs about as much CPU as SQLite inserting them, and
in one process the two cannot overlap: the ``sqlite3`` module binds parameters holding the GIL.
So ``Manifest.rows()`` hands a big CSV or JSONL file to a helper process: the same interpreter
running :func:`_helper_main`, which opens the file with the same code
(``open_manifest(...).rows()``) and writes the rows to its stdout in chunks, while the
importing process inserts the chunks before them.

The stream ends with one message: the manifest's warnings, or the ``ManifestInvalid`` that the
iteration raises in the importing process (errors are picklable, see ``jobs.errors``). Rows come
first, as in process, so an invalid manifest still fails the import only at the end and its one
transaction rolls back as before. A helper that ends without that message (killed, or a bug:
its traceback is on stderr) fails the import with ``JobStoreError``. The helper does not outlive
the import: closing the iterator kills it; if the importing process dies, the helper's next
write to the closed pipe ends it; Ctrl-C reaches both (one process group) and ends it quietly.

The messages are framed: a kind and a length, then the chunk's rows in ``marshal`` form
(tuples of str, int and bool: a third cheaper to write and read than pickle, and the helper is
the busier process) or the end, pickled. Both are safe to load here: the only writer is our
own child, the same interpreter.

For SQLite the helper can hand the rows over grouped (:meth:`HelperRows.flat`): each
multi-row ``INSERT``'s parameters in one flat tuple, which is cheaper to write and to read than
as many tuples as rows, and which the importing process binds as it is.

The helper may be started before its rows are wanted (:meth:`HelperRows.start`), so that it
reads while the importing process still gets ready (hashing the manifest, opening the
transaction: ~0.3 s of a million-row import that the helper, alone on the other core, spends
checking ~60,000 rows instead). Which form the rows go in (one by one, or groups of how many)
is only known when they are taken, so the helper reads it from its stdin, one line written
when the first row is asked for; until then it keeps what it read (at most
``EARLY_CHUNKS`` chunks), and it ends quietly if its stdin closes unwritten (the importing
process gave up, or died).
"""

from __future__ import annotations

import contextlib
import marshal
import os
import pickle
import select
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any

from jobs.errors import JobStoreError, ManifestError, ManifestInvalid
from jobs.spec import JobRow

__all__ = ["CHUNK", "HelperRows", "helper_rows"]

CHUNK = 1024  # rows per message, ~180 KB: five fit in the widened pipe (see _widen)
EARLY_CHUNKS = 64  # chunks a helper started early keeps until asked: ~65,000 rows, ~46 MB
_PIPE_BYTES = 1 << 20  # the most Linux gives an unprivileged process by default
_HEADER = struct.Struct("<cI")  # the kind of message (_ROWS or _END) and its length
_ROWS, _END = b"R", b"E"
_PACKAGE = str(Path(__file__).resolve().parent)  # this very jobs package, wherever it is
# The helper's entry point. Default SIGINT and SIGPIPE actions: an interrupted or orphaned
# helper ends quietly, like any Unix filter. The package is registered without running its
# __init__, which imports the store and SQLAlchemy: the helper needs neither, and the importer
# waits for its first rows meanwhile (0.27 s to start instead of 0.06 s).
_BOOT = "; ".join(  # one line: it is the helper's command line in ps and py-spy
    [
        "import signal, sys",
        "signal.signal(signal.SIGINT, signal.SIG_DFL)",
        "hasattr(signal, 'SIGPIPE') and signal.signal(signal.SIGPIPE, signal.SIG_DFL)",
        "from importlib.util import module_from_spec, spec_from_file_location",
        "spec = spec_from_file_location('jobs', sys.argv[1] + '/__init__.py', "
        "submodule_search_locations=[sys.argv[1]])",
        "sys.modules['jobs'] = module_from_spec(spec)",
        "from jobs.readahead import _helper_main",
        "sys.exit(_helper_main(sys.argv[2:]))",
    ]
)

Done = Callable[[list[ManifestError], int], None]


def helper_rows(shown: str, max_errors: int, done: Done, rules: tuple[str, str, str]) -> HelperRows:
    """The rows of the manifest at ``shown``, read and checked by a helper process.

    The process starts when the first row is asked for. ``done(warnings, warning_count)`` is
    called when every row was read; a ``ManifestInvalid`` is raised as the in-process
    iteration raises it. ``rules`` is the model rules' ``reference``: the folder holding their
    package, the module and the attribute the helper imports them from.
    """
    return HelperRows(shown, max_errors, done, rules)


class HelperRows(Iterator[JobRow]):
    """An iterator of a manifest's rows that a helper process reads (see the module
    docstring); or, through :meth:`flat` before the first row, the same rows grouped."""

    def __init__(self, shown: str, max_errors: int, done: Done, rules: tuple[str, str, str]):
        self._shown = shown
        self._args = [shown, str(max_errors), *rules]
        self._done = done
        self._rows: Iterator[JobRow] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __iter__(self) -> HelperRows:
        return self

    def __next__(self) -> JobRow:
        if self._rows is None:
            self._rows = self._messages(None)
        return next(self._rows)

    def start(self) -> None:
        """Start the helper now, before the first row is asked for: it reads meanwhile (see
        the module docstring). Whoever starts it must :meth:`close` it if the rows are not
        taken after all."""
        if self._proc is None and self._rows is None:
            self._proc = self._spawn()

    def close(self) -> None:
        """Stop reading: the helper, if it was started, is ended."""
        if self._rows is not None:
            close = getattr(self._rows, "close", None)
            if close is not None:
                close()
        self._rows = iter(())
        proc, self._proc = self._proc, None
        if proc is not None:  # started, its rows never taken
            _end(proc)

    def flat(self, width: int) -> Iterator[tuple[Any, ...]]:
        """The rows ``width`` at a time, each group's values in one flat tuple (the parameters
        of a multi-row ``INSERT``), the last group shorter if the rows run out; ``width`` must
        divide :data:`CHUNK`. Only before the first row was taken; closing it stops the
        helper."""
        if self._rows is not None:
            raise RuntimeError("the rows were already taken one by one")
        if width < 1 or CHUNK % width:
            raise ValueError(f"{width} rows a group does not divide {CHUNK}")
        self._rows = iter(())
        return self._messages(width)

    def _spawn(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-c", _BOOT, _PACKAGE, *self._args]
        try:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=1 << 16
            )
        except OSError as exc:
            raise JobStoreError(
                f"cannot start a helper process to read {self._shown}: {exc}"
            ) from exc
        assert proc.stdout is not None
        _widen(proc.stdout)
        return proc

    def _messages(self, width: int | None) -> Iterator[Any]:
        """Start the helper (unless it was) and yield its rows (``width`` None), or its flat
        groups."""
        shown = self._shown
        proc, self._proc = self._proc or self._spawn(), None
        stream, ask = proc.stdout, proc.stdin
        assert stream is not None and ask is not None
        try:
            with contextlib.suppress(OSError):  # a helper already gone: said below
                ask.write(b"%d\n" % (width or 0))
                ask.close()
            while True:
                header = stream.read(_HEADER.size)
                kind, size = _HEADER.unpack(header) if len(header) == _HEADER.size else (b"", 0)
                payload = stream.read(size)
                if kind not in (_ROWS, _END) or len(payload) != size:
                    status = proc.wait()
                    raise JobStoreError(
                        f"the helper process reading {shown} stopped (exit status {status})"
                    )
                if kind == _ROWS:
                    yield from marshal.loads(payload)  # rows, or flat groups of rows
                    continue
                end, detail = pickle.loads(payload)
                if end == "invalid":
                    raise detail
                self._done(*detail)
                return
        finally:
            _end(proc)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill the helper if it still runs (stopped early: an error, a cancelled import, rows
    not wanted after all; or it is just ending), and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _widen(pipe: IO[bytes]) -> None:
    """Let the helper run a few chunks ahead. In a 64 KiB pipe it cannot get a whole chunk
    ahead of the importer, and the two processes mostly take turns (1M rows: 7.3 s to import
    instead of 5.0-5.4 s)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setsize is not None:
        with contextlib.suppress(OSError):  # a lower system limit: keep the default
            fcntl.fcntl(pipe.fileno(), setsize, _PIPE_BYTES)


def _helper_main(argv: list[str]) -> int:
    """The helper process: the manifest's rows, then how the reading ended, to stdout."""
    from jobs.manifest import open_manifest  # here: jobs.manifest imports this module

    shown, max_errors = argv[0], int(argv[1])
    rules = _load_rules(*argv[2:5])
    out = sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the data stream
    asked = _Asked(sys.stdin.fileno())
    held: list[list[JobRow]] = []  # chunks read before the form was asked for
    end: tuple[str, Any]
    try:
        manifest = open_manifest(shown, rules=rules, max_errors=max_errors)
        rows = manifest.rows(helper=False)
        while chunk := list(islice(rows, CHUNK)):
            if asked.width is None:
                held.append(chunk)
                if len(held) < EARLY_CHUNKS and not asked.ready():
                    continue
                if not asked.wait():
                    return 0  # nobody wants the rows
                for kept in held:
                    _send_rows(out, kept, asked.width or 0)
                held.clear()
            else:
                _send_rows(out, chunk, asked.width)
        end = ("done", (manifest.warnings, manifest.warning_count))
    except ManifestInvalid as exc:
        end = ("invalid", exc)
    if asked.width is None:
        if not asked.wait():
            return 0
        for kept in held:
            _send_rows(out, kept, asked.width or 0)
    _send(out, _END, pickle.dumps(end, protocol=pickle.HIGHEST_PROTOCOL))
    out.flush()
    return 0


class _Asked:
    """The helper's side of its stdin: the form the rows are wanted in, once written (rows
    one by one: 0; else groups of ``width``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.width: int | None = None

    def ready(self) -> bool:
        """Whether the line was written (or stdin closed): reading it will not wait."""
        try:
            return bool(select.select([self.fd], [], [], 0)[0])
        except (OSError, ValueError):  # pragma: no cover - no select on pipes (Windows)
            return True

    def wait(self) -> bool:
        """Read the line (waiting for it); False if stdin closed without one."""
        line = b""
        while not line.endswith(b"\n"):
            data = os.read(self.fd, 64)
            if not data:
                return False
            line += data
        self.width = int(line)
        return True


def _send_rows(out: IO[bytes], chunk: list[JobRow], width: int) -> None:
    if width:  # one flat tuple a group: fewer objects to write and to read
        flat = chain.from_iterable
        groups = [tuple(flat(chunk[i : i + width])) for i in range(0, len(chunk), width)]
        _send(out, _ROWS, marshal.dumps(groups))
    else:
        _send(out, _ROWS, marshal.dumps(chunk))


def _load_rules(folder: str, module: str, attribute: str) -> Any:
    """The model rules, imported like ``jobs``: their package registered without running its
    ``__init__`` (which may import the store, or a ``jobs`` that is registered bare here)."""
    import importlib
    from importlib.util import module_from_spec, spec_from_file_location

    package = module.split(".", 1)[0]
    if package not in sys.modules:
        location = str(Path(folder) / package)
        spec = spec_from_file_location(
            package, location + "/__init__.py", submodule_search_locations=[location]
        )
        if spec is None:  # pragma: no cover - the folder was checked by the caller
            raise ImportError(f"no package {package} in {folder}")
        sys.modules[package] = module_from_spec(spec)
    return getattr(importlib.import_module(module), attribute)


def _send(out: IO[bytes], kind: bytes, payload: bytes) -> None:
    out.write(_HEADER.pack(kind, len(payload)))
    out.write(payload)
