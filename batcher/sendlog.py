"""The calls a run has sent and not yet had answered, kept in a file beside the job table, so
that the next run knows which of a killed run's calls may have been billed.

A synchronous call (z-image-turbo, Qwen) has no task id to find it again: killed while its
answer was on the way (``kill -9``, a reboot), the run never learns whether the service made
and billed the image, and the next run sends the job again. Writing each send to the job table
first would cost a database round trip per job; appending one line to a file costs one
``write(2)``, and the kernel keeps it through a ``kill -9`` (a power cut may lose the last lines:
the count is then low, never high). Each line is ``[job id, claim token]``.

The next run, holding the folder's lock, reads the file before it takes back the dead run's
jobs (:meth:`jobs.JobStore.note_lost_answers`): a job still ``running`` under the claim token a
line names had its call sent and its answer lost, so its ``ambiguous`` count goes up by one, as
for any call whose answer was lost. A job only claimed, never sent, is not counted.

The file stays small: once it passes ``ROTATE_AT`` bytes it is rewritten, at a moment when it
holds nothing but the calls still in flight, under a temporary name then renamed. A run on a
shared table (PostgreSQL) keeps none: another worker takes a dead worker's jobs over, and the
lease, not a file of the folder, fences them.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / ".calls-in-flight"
>>> log = SendLog(path)
>>> log.sent("a", "t1"); log.sent("产品-b", "t2"); log.answered("a")
>>> sorted(lost_answers(path))
[('a', 't1'), ('产品-b', 't2')]
>>> log.close(); lost_answers(path)
[]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from pathlib import Path

__all__ = ["ROTATE_AT", "SendLog", "lost_answers"]

log = logging.getLogger("batcher")

ROTATE_AT = 1 << 20  # bytes: rewrite the file with just the calls in flight past this size


class SendLog:
    """One run's file of sent calls (see the module docstring). Best effort: a disk that
    refuses the write makes the count low, and is said once in the log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open: dict[str, str] = {}  # job id -> claim token of its call in flight
        self._size = 0
        self._failed = False
        self._fd: int | None = None
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:  # the run goes on; its calls in flight go uncounted
            self._failed = True
            log.warning("could not open %s: %s", path, exc.strerror or exc)

    def sent(self, job_id: str, token: str) -> None:
        """A call for ``job_id`` (claimed under ``token``) goes out now."""
        self._open[job_id] = token
        self._write(_line(job_id, token))

    def answered(self, job_id: str) -> None:
        """The call's outcome is recorded (or its job released): no longer in flight."""
        self._open.pop(job_id, None)
        if self._size > ROTATE_AT:
            self._rotate()

    def close(self) -> None:
        """The run ended and released what it held: nothing is in flight; the file goes."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # a read-only folder: the next run finds no job to count
            log.warning("could not remove %s: %s", self.path, exc.strerror or exc)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._size += len(data)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning(
                    "could not note a sent call in %s (%s): a kill now would count fewer "
                    "calls as perhaps billed",
                    self.path,
                    exc.strerror or exc,
                )

    def _rotate(self) -> None:
        """Rewrite the file with only the calls in flight (a rename: never a file without
        them)."""
        if self._fd is None:
            return
        data = b"".join(_line(job_id, token) for job_id, token in self._open.items())
        temp = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.part")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.replace(temp, self.path)
            except OSError:
                os.close(fd)
                raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            log.warning("could not rewrite %s: %s", self.path, exc.strerror or exc)
            self._size = 0  # try again after as many more calls, not after each
            return
        os.close(self._fd)
        self._fd = fd
        self._size = len(data)


def _line(job_id: str, token: str) -> bytes:
    return (json.dumps([job_id, token], ensure_ascii=False) + "\n").encode("utf-8")


def lost_answers(path: Path) -> list[tuple[str, str]]:
    """The calls a file names, ``(job id, claim token)``: those of a run that did not end
    cleanly (a clean end removes the file). A torn last line (the kill came mid-write) and
    lines of another form are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("could not read %s: %s", path, exc.strerror or exc)
        return []
    found: dict[str, str] = {}
    for raw in data.splitlines():
        try:
            job_id, token = json.loads(raw)
        except (ValueError, TypeError):
            continue
        if isinstance(job_id, str) and isinstance(token, str):
            found[job_id] = token
    return list(found.items())
